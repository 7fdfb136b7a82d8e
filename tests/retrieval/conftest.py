"""Shared fixtures for the retrieval tests: a random-weight tiny encoder, a toy class-coloured image/text set, and a
small dataset directory in the on-disk format."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from dxrag.core.dataset import DatasetMeta, DatasetWriter, load_dataset
from dxrag.core.records import CorpusItem, Query

CLASSES = ("red", "green", "blue", "yellow")
_COLOURS = np.array([[190, 60, 60], [60, 190, 60], [60, 60, 190], [190, 190, 60]], dtype=np.float64)


def toy_pairs(n_per_class: int, seed: int = 0) -> tuple[list[Image.Image], list[str], np.ndarray]:
    """32×32 images whose colour and stripe orientation depend on the class, and texts that name the class."""
    rng = np.random.default_rng(seed)
    images, texts, labels = [], [], []
    yy, xx = np.mgrid[0:32, 0:32]
    for i in range(n_per_class * len(CLASSES)):
        c = i % len(CLASSES)
        stripes = ((xx if c % 2 else yy) // 4 % 2)[..., None] * 40.0
        pixels = _COLOURS[c] + stripes + rng.normal(0, 35, (32, 32, 3))
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
        texts.append(f"report {i}: the finding is {CLASSES[c]} class {c}, size {rng.integers(1, 9)} mm.")
        labels.append(c)
    return images, texts, np.asarray(labels)


@pytest.fixture(scope="session")
def make_pairs():
    """The `toy_pairs` generator (test modules cannot import conftest under --import-mode=importlib)."""
    return toy_pairs


@pytest.fixture(scope="session")
def tiny_encoder():
    from dxrag.core.retrieval.encoders import TINY_MODEL, Encoder

    torch.manual_seed(0)
    return Encoder.load(TINY_MODEL)


def write_toy_dataset(out, n_per_class: int = 12, seed: int = 0, text_suffix: str = ""):
    images, texts, labels = toy_pairs(n_per_class, seed)
    q_images, _, q_labels = toy_pairs(2, seed + 100)
    with DatasetWriter(out) as w:
        for i, (im, text, lab) in enumerate(zip(images, texts, labels)):
            w.corpus.append(CorpusItem(id=f"c{i:04d}", image=w.add_image(f"c{i:04d}", im), text=text + text_suffix,
                                       label=CLASSES[lab]))
        for i, (im, lab) in enumerate(zip(q_images, q_labels)):
            w.queries["val"].append(Query(id=f"q{i:03d}", image=w.add_image(f"q{i:03d}", im),
                                          question="Which colour?", candidates=CLASSES, label=CLASSES[lab]))
        w.meta = DatasetMeta(name="toy", task="classification", labels=list(CLASSES))
    return load_dataset(out)


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("data") / "toy")
