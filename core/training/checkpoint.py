"""Training checkpoints, one format for every training loop that checkpoints (reader fine-tuning and projector
alignment, `finetune.py`; retriever distillation, `distill.py`): a folder replaced atomically (everything of one step
or nothing) holding

- `weights.safetensors`: the trainable tensors;
- `optimizer.pt`: the optimizer's state, read back with `torch.load(weights_only=True)`;
- `state.json`: the step, the history, what else the loop keeps as JSON (a schedule's and numpy's RNG state) and
  `settings`: the settings a resumed run must share with the interrupted one, checked on load;
- `arrays.npz` (optional): numpy arrays of numbers or strings, read without pickle (the distillation judge cache,
  the reader's sample order, torch's RNG state).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..base.fsutil import atomic_dir

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
ARRAYS_FILE = "arrays.npz"
OLD_READER_FILES = ("state.pt", "trainable.safetensors", "history.json")  # the reader's format before this one


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: written with other settings, or in a format no longer read; the
    message names the file and what to do."""


@dataclass
class Checkpoint:
    """What `load_checkpoint` read: the tensors, the optimizer state (None when none was saved), the JSON state and
    the arrays (None when none were saved)."""

    tensors: dict
    optimizer: dict | None
    state: dict[str, Any]
    arrays: dict[str, Any] | None


def _json(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), so settings compare equal across a save."""
    return json.loads(json.dumps(value))


def has_checkpoint(path: Path | None) -> bool:
    """Whether `path` holds a checkpoint to resume from; a reader checkpoint of the older format (`state.pt`,
    `trainable.safetensors`, `history.json`) is refused with what to do."""
    if path is None:
        return False
    path = Path(path)
    if (path / OLD_READER_FILES[0]).exists() and not (path / STATE_FILE).exists():
        raise CheckpointError(f"{path / OLD_READER_FILES[0]}: a reader checkpoint in the format of dxrag before "
                              f"checkpoints were unified ({', '.join(OLD_READER_FILES)}), which this version does not "
                              f"read; delete {path} to restart this training stage from step 0 (finished stages "
                              f"are kept), or finish the run with the version that wrote it")
    return (path / STATE_FILE).exists()


def save_checkpoint(path: Path, tensors: dict, optimizer_state: dict | None, state: dict[str, Any],
                    settings: dict[str, Any], arrays: dict[str, Any] | None = None) -> None:
    """Write one checkpoint folder atomically: `tensors` (safetensors), `optimizer_state` (torch.save),
    `state` + `settings` (JSON), `arrays` (numpy arrays of numbers or strings, no objects)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    with atomic_dir(Path(path)) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        if arrays:
            with open(tmp / ARRAYS_FILE, "wb") as f:
                np.savez(f, **arrays)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "settings": settings}, indent=2), encoding="utf-8")


def check_settings(path: Path, state: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse a checkpoint written with other settings than `settings`. A distillation checkpoint written before
    checkpoints recorded their settings (no `settings` in state.json) is read as it is (logged)."""
    saved = state.get("settings")
    if saved is None:
        log.warning("%s: a checkpoint that records no settings (written by an older dxrag); resuming without "
                    "checking them", Path(path) / STATE_FILE)
        return
    if saved != _json(settings):
        diff = sorted(k for k in set(saved) | set(_json(settings)) if saved.get(k) != _json(settings).get(k))
        raise CheckpointError(f"{Path(path) / STATE_FILE}: written by a run with settings {saved}, which differ from "
                              f"{settings} (at {', '.join(diff)}); use another checkpoint folder or the same "
                              f"settings")


def load_arrays(path: Path) -> dict[str, Any] | None:
    """The arrays saved with a checkpoint (read without pickle), or None when it has none."""
    import numpy as np

    file = Path(path) / ARRAYS_FILE
    if not file.is_file():
        return None
    with np.load(file, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def load_checkpoint(path: Path, settings: dict[str, Any]) -> Checkpoint:
    """Read the checkpoint in `path`, after checking it was written with `settings` (`check_settings`)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    check_settings(path, state, settings)
    optimizer = path / OPTIMIZER_FILE
    return Checkpoint(load_file(str(path / WEIGHTS_FILE)),
                      torch.load(optimizer, weights_only=True) if optimizer.exists() else None, state,
                      load_arrays(path))
