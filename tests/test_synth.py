"""The embedded default dataset: deterministic, valid, and built so that retrieval matters."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dxrag.core.data.synth import GRADES, generate
from dxrag.core.dataset import load_dataset, sha256_file


def _pixels(ds, items) -> np.ndarray:
    return np.stack([np.asarray(Image.open(ds.image_path(i.image)), dtype=np.float32).ravel() / 255 for i in items])


def _labels(items) -> np.ndarray:
    index = {g: i for i, g in enumerate(GRADES)}
    return np.array([index[i.label] for i in items])


def _softmax_regression(x, y, steps=300, lr=0.5, l2=1e-3):
    """Reference 'small classifier': multinomial logistic regression, full-batch gradient descent."""
    n, d = x.shape
    w = np.zeros((d, len(GRADES)))
    b = np.zeros(len(GRADES))
    onehot = np.eye(len(GRADES))[y]
    for _ in range(steps):
        z = x @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / n
        w -= lr * (x.T @ g + l2 * w)
        b -= lr * g.sum(0)
    return w, b


@pytest.fixture(scope="module")
def features(synth_dir):
    ds = load_dataset(synth_dir)
    corpus, train, test = ds.corpus, ds.queries["train"], ds.queries["test"]
    c, tr, te = _pixels(ds, corpus), _pixels(ds, train), _pixels(ds, test)
    mu, sd = c.mean(0), c.std(0) + 1e-6
    return dict(ds=ds, c=(c - mu) / sd, cy=_labels(corpus), tr=(tr - mu) / sd, ty=_labels(train),
                te=(te - mu) / sd, ey=_labels(test))


def test_default_sizes_and_validity(synth_dir):
    ds = load_dataset(synth_dir, decode_images=True)
    assert len(ds.corpus) == 2000
    assert {s: len(q) for s, q in ds.queries.items()} == {"train": 1000, "val": 200, "test": 500}
    assert ds.meta.labels == list(GRADES)
    im = ds.load_image(ds.corpus[0].image)
    assert im.size == (32, 32) and im.mode == "RGB"
    kinds = {c.metadata["kind"] for c in ds.corpus}
    assert kinds == {"faithful", "misleading", "mislabeled"}
    assert all(c.label in c.text for c in ds.corpus), "every report names its grade"
    assert set(_labels(ds.queries["test"])) == set(range(5))


def test_deterministic_by_seed(tmp_path):
    small = dict(n_patients=20, n_corpus=60, n_train=10, n_val=5, n_test=5)
    a = generate(tmp_path / "a", seed=3, **small)
    b = generate(tmp_path / "b", seed=3, **small)
    c = generate(tmp_path / "c", seed=4, **small)
    assert sha256_file(a / "corpus.jsonl") == sha256_file(b / "corpus.jsonl")
    assert sha256_file(a / "images" / "c000007.png") == sha256_file(b / "images" / "c000007.png")
    assert sha256_file(a / "corpus.jsonl") != sha256_file(c / "corpus.jsonl")


def test_retrieval_beats_image_only_classifier(features):
    """A nearest-neighbour vote over the corpus beats a classifier trained on the query images alone."""
    f = features
    d = (f["te"] ** 2).sum(1)[:, None] - 2 * f["te"] @ f["c"].T + (f["c"] ** 2).sum(1)[None]
    top5 = f["cy"][np.argsort(d, axis=1)[:, :5]]
    vote = np.array([np.bincount(v, minlength=5).argmax() for v in top5])
    knn_acc = (vote == f["ey"]).mean()
    w, b = _softmax_regression(f["tr"], f["ty"])
    clf_acc = ((f["te"] @ w + b).argmax(1) == f["ey"]).mean()
    assert knn_acc > clf_acc + 0.2, (knn_acc, clf_acc)
    assert clf_acc > 0.25, "images alone carry some signal (lesion spots), above the 0.2 chance level"


def test_top5_neighbours_disagree_for_some_queries(features):
    f = features
    d = (f["te"] ** 2).sum(1)[:, None] - 2 * f["te"] @ f["c"].T + (f["c"] ** 2).sum(1)[None]
    top5 = f["cy"][np.argsort(d, axis=1)[:, :5]]
    inconsistent = np.mean([len(set(v)) > 1 for v in top5])
    assert 0.15 <= inconsistent <= 0.5, inconsistent
