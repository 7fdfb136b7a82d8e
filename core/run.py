"""A run's directory and its bookkeeping: one marker per finished stage, so that rerunning a command skips what is
done (`dxrag run`, core/pipeline.py; the stages, core/stages.py). Training checkpoints inside it have their own
format (core/training/checkpoint.py); provenance lives in `dxrag.core.base.provenance`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .base.fsutil import atomic_write_json


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
