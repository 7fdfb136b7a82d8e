"""Where a run's dataset comes from (`data` of the run config): generated (`synth`, core/data/synth.py), converted from
MedMNIST (core/data/medmnist.py) or an existing dataset directory. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .synth import SynthConfig


@dataclass
class DataConfig:
    kind: str = "synth"  # synth | medmnist (both built into <run dir>/data) | dir (an existing dataset directory)
    path: str | None = None  # dataset directory for kind=dir
    seed: int = 0
    synth: SynthConfig = field(default_factory=SynthConfig)  # kind=synth: the generator's knobs
    flag: str | None = None  # kind=medmnist: the MedMNIST flag, e.g. breastmnist
    npz: str | None = None  # kind=medmnist: local npz file (None: the medmnist package downloads it when online)
