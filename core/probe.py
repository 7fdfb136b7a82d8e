"""The `probe` baseline system: logistic regression on the frozen features of a pretrained vision encoder
(EfficientNet-Lite0, ImageNet, from the weights cache), fitted on the training queries' images and labels only.

A reader built on the same frozen features should at least match it closed-book: the probe is the floor that shows
where a run's reader stands (issue 20; on BreastMNIST at 112² it reaches 0.83-0.85 where the majority class is
0.731). It answers single-label classification queries only; its regularisation strength is the one of `c_grid` with
the best validation accuracy (the test split is never looked at before prediction).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

SYSTEM = "probe"
PROBE_MODES = ("auto", "on", "off")


class ProbeError(RuntimeError):
    """The probe cannot run here (weights or scikit-learn missing, a task it does not answer); the message says why
    and what to install."""


@dataclass
class ProbeSettings:
    """The `probe` system of a run. `mode`: auto (run it when the encoder's weights and scikit-learn are installed
    and the task is single-label classification; otherwise log why not), on (the same, but a missing piece is an
    error), off."""

    mode: str = "auto"
    weights: str = "efficientnet-lite0"  # a name of dxrag.core.weights (a timm tf_efficientnet_lite0 state dict)
    image_size: int = 112  # 28² MedMNIST images upscaled (bicubic); a 4x4x1280 map pooled to 1280 features
    c_grid: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])  # inverse L2 strengths tried
    # class weighting tried with each C: false (the training split's prior) and true (classes weighted by inverse
    # frequency, which undoes a skewed training prior such as the shared PneumoniaMNIST train split's 90 % pneumonia)
    balanced: list[bool] = field(default_factory=lambda: [False, True])
    batch_size: int = 64

    def check(self, where: str = "probe") -> None:
        if self.mode not in PROBE_MODES:
            raise ValueError(f"{where}.mode {self.mode!r} is not one of {list(PROBE_MODES)}")
        if self.image_size < 32:
            raise ValueError(f"{where}.image_size must be at least 32 (EfficientNet downsamples 32x), got "
                             f"{self.image_size}")
        if not self.c_grid or any(c <= 0 for c in self.c_grid):
            raise ValueError(f"{where}.c_grid must list positive numbers, got {self.c_grid}")
        if not self.balanced:
            raise ValueError(f"{where}.balanced must list at least one of false, true")


def unavailable(settings: ProbeSettings, task: str) -> str | None:
    """Why the probe cannot run (None when it can): its task, scikit-learn or the encoder's weights."""
    if task != "classification":
        return f"the probe answers single-label classification only (this dataset's task: {task})"
    if find_spec("sklearn") is None:
        return "scikit-learn is not installed (pip install 'dxrag[learn]')"
    from .weights import WeightsError, path

    try:
        path(settings.weights)
    except WeightsError as e:
        return str(e)
    return None


def load_encoder(name: str = "efficientnet-lite0"):
    """timm's tf_efficientnet_lite0 without its classifier (global-average-pooled 1280-d features), in eval mode, with
    the weights cache's ImageNet weights (safetensors)."""
    import timm

    from .fast_convs import pin_convs
    from .weights import WeightsError, load_into

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    try:
        load_into(model, name)
    except WeightsError as e:
        raise ProbeError(f"probe weights {name!r}: {e}") from None
    pin_convs(model)
    return model.eval()


def image_features(model, paths: Sequence[Path], image_size: int, batch_size: int = 64) -> np.ndarray:
    """(N, 1280) pooled features of the images: RGB, resized bicubic to image_size², normalised with mean = std = 0.5
    (EfficientNet-Lite's TF preprocessing)."""
    import torch
    from PIL import Image

    from .base.dataset import open_image

    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            batch = [np.asarray(open_image(p).resize((image_size, image_size), Image.BICUBIC), dtype=np.float32)
                     for p in paths[start:start + batch_size]]
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2) / 255.0
            out.append(model((x - 0.5) / 0.5).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1280), dtype=np.float32)


@dataclass
class FittedProbe:
    """A fitted probe: standardisation + multinomial logistic regression over `classes`."""

    classes: list[str]
    c: float
    balanced: bool
    val_accuracy: float | None
    model: object

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, len(classes)) class probabilities."""
        return self.model.predict_proba(x)


def fit(train_x: np.ndarray, train_y: Sequence[str], val_x: np.ndarray | None, val_y: Sequence[str] | None,
        c_grid: Sequence[float], balanced: Sequence[bool] = (False,), seed: int = 0) -> FittedProbe:
    """Logistic regression on standardised features for each C of `c_grid` and class weighting of `balanced`; the
    one with the best validation accuracy (ties: the smaller validation log-loss, then the earlier in the grids) is
    kept. Without validation queries: the middle of the C grid with the first weighting."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = sorted(set(train_y))
    if len(classes) < 2:
        raise ProbeError(f"the training queries hold one label only ({classes}); the probe needs two or more")

    def make(c: float, weighted: bool):
        return make_pipeline(StandardScaler(), LogisticRegression(
            C=c, max_iter=5000, random_state=seed, class_weight="balanced" if weighted else None)).fit(
            train_x, train_y)

    if val_x is None or not len(val_x):
        c = sorted(c_grid)[len(c_grid) // 2]
        return FittedProbe(classes, c, balanced[0], None, make(c, balanced[0]))
    best = None
    for c, weighted in ((c, w) for w in balanced for c in c_grid):
        model = make(c, weighted)
        proba = model.predict_proba(val_x)
        acc = float(np.mean(model.classes_[proba.argmax(1)] == np.asarray(val_y)))
        known = np.isin(np.asarray(val_y), model.classes_)
        loss = log_loss(np.asarray(val_y)[known], proba[known], labels=model.classes_) if known.any() else np.inf
        log.info("probe C=%g%s: validation accuracy %.3f, log-loss %.3f", c, " balanced" * weighted, acc, loss)
        if best is None or (acc, -loss) > (best[0], -best[1]):
            best = (acc, loss, c, weighted, model)
    acc, _, c, weighted, model = best
    return FittedProbe(classes, c, weighted, acc, model)
