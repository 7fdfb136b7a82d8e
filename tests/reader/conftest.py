"""Fixtures for the reader tests: a small generated dataset (32x32 noise images, texts that state the label) and a
tiny reader built from it."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LABELS = ["normal", "mild", "moderate", "severe", "proliferative"]
QUESTION = "What is the severity of the retinopathy?"


def _noise(rng: np.random.Generator, label_index: int):
    from PIL import Image

    pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    pixels[:4, :4] = 50 * label_index  # a faint label cue in one corner
    return Image.fromarray(pixels)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's ops are too small to gain from intra-op threads, and on a shared 2-core machine two threads
    per process oversubscribe the cores (measured: 10x slower fine-tuning under load). Restored afterwards."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
    """60 corpus items whose text names their label, and 40 train / 20 val queries over the same labels."""
    from dxrag.core.base.dataset import DatasetMeta, DatasetWriter, load_dataset
    from dxrag.core.base.records import CorpusItem, Query

    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("reader") / "toy"
    with DatasetWriter(out) as w:
        for i in range(60):
            k = i % len(LABELS)
            rel = w.add_image(f"c{i:03d}", _noise(rng, k))
            w.corpus.append(CorpusItem(id=f"c{i:03d}", image=rel, text=f"report findings consistent with "
                                       f"{LABELS[k]} disease in this eye .", label=LABELS[k]))
        for split, n in (("train", 40), ("val", 20)):
            for i in range(n):
                k = int(rng.integers(len(LABELS)))
                qid = f"{split}{i:03d}"
                rel = w.add_image(qid, _noise(rng, k))
                w.queries[split].append(Query(id=qid, image=rel, question=QUESTION, candidates=tuple(LABELS),
                                              label=LABELS[k]))
        w.meta = DatasetMeta(name="toy", task="classification", labels=list(LABELS))
    return load_dataset(out)


@pytest.fixture(scope="session")
def tiny_reader(toy_dataset):
    from dxrag.core.reader.model import Reader
    from dxrag.core.reader.settings import ReaderSettings

    return Reader.from_config(ReaderSettings(model="tiny", device="cpu", batch_size=8), dataset=toy_dataset)


def context_for(dataset, query, shift: int = 0):
    """A corpus item whose label is the query's (shift=0) or another label."""
    want = LABELS[(LABELS.index(query.label) + shift) % len(LABELS)]
    return next(item for item in dataset.corpus if item.label == want)
