"""The embedded default dataset: deterministic, valid, and built so that retrieval matters."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dxrag.core.data.synth import GRADES, generate
from dxrag.core.base.dataset import load_dataset, sha256_file

EMBEDDED = str(Path(__file__).resolve().parents[2] / "configs" / "embedded.yaml")


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
    assert 0.15 <= inconsistent <= 0.6, inconsistent


HARD = dict(n_patients=40, n_corpus=400, n_train=10, n_val=5, n_test=300,
            jitter_gain=2.0, noise_gain=3.0, blur=1.5, lesion_fade=0.9)


def test_hard_exams_are_harder_to_retrieve(tmp_path):
    """What the docstring says of difficulty: hard queries find their patient's prior exams less often (lower
    pixel-kNN accuracy) and their top-4 neighbours disagree more often than easy queries'."""
    ds = load_dataset(generate(tmp_path / "hard", seed=1, **HARD))
    c, te = _pixels(ds, ds.corpus), _pixels(ds, ds.queries["test"])
    cy, ey = _labels(ds.corpus), _labels(ds.queries["test"])
    d = (te**2).sum(1)[:, None] - 2 * te @ c.T + (c**2).sum(1)[None]
    top4 = cy[np.argsort(d, axis=1)[:, :4]]
    difficulty = np.array([q.metadata["difficulty"] for q in ds.queries["test"]])
    hard = difficulty > np.median(difficulty)
    top1 = top4[:, 0] == ey
    disagree = np.array([len(set(v)) > 1 for v in top4])
    assert top1[hard].mean() < top1[~hard].mean() - 0.1, (top1[hard].mean(), top1[~hard].mean())
    assert disagree[hard].mean() > disagree[~hard].mean() + 0.05, (disagree[hard].mean(), disagree[~hard].mean())


def test_hard_exams_show_fainter_lesions():
    """Lesion visibility: the lesions' pixel signal (image with spots minus the same image without, noise off)
    shrinks by (1 - lesion_fade) at difficulty 1, and blur spreads it out."""
    from dxrag.core.data.synth import SynthConfig, _Renderer

    cfg = SynthConfig(pixel_noise=0.0, lesion_fade=0.8, blur=1.5, lesion_contrast=0.3)
    renderer = _Renderer(cfg, np.random.default_rng(0))
    anatomy = np.zeros(cfg.anatomy_dims)

    def signal(difficulty: float) -> np.ndarray:
        spots = renderer.render(anatomy, 6, difficulty, np.random.default_rng(5)).astype(float)
        clean = renderer.render(anatomy, 0, difficulty, np.random.default_rng(5)).astype(float)
        return np.abs(spots - clean)

    easy, hard = signal(0.0), signal(1.0)
    assert hard.sum() < 0.5 * easy.sum()
    assert hard.max() < 0.2 * easy.max()


def test_difficulty_effects_off_give_the_plain_generator(tmp_path):
    """Difficulty draws come from their own stream: with every effect at 0 the Beta parameters change nothing."""
    small = dict(n_patients=10, n_corpus=30, n_train=5, n_val=2, n_test=3, lesion_fade=0.0, noise_gain=0.0,
                 blur=0.0, jitter_gain=0.0)
    a = generate(tmp_path / "a", seed=2, **small, difficulty_a=1.0, difficulty_b=1.0)
    b = generate(tmp_path / "b", seed=2, **small, difficulty_a=5.0, difficulty_b=0.5)
    for name in ("c000003.png", "q000004.png"):
        assert sha256_file(a / "images" / name) == sha256_file(b / "images" / name)


# A base install (`pip install dxrag`, no `train` extra) simulated in a fresh interpreter: None in sys.modules makes
# `import torch` fail and importlib.util.find_spec report it missing, as when the package is not installed.
BLOCKED = ("torch", "torchvision", "transformers", "peft", "open_clip", "faiss", "safetensors", "timm")


def _run_on_a_base_install(argv: list[str]) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        import sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None
        from dxrag.core.cli import TRAIN_MODULES, main
        assert set(TRAIN_MODULES) <= set({BLOCKED!r}), sorted(set(TRAIN_MODULES) - set({BLOCKED!r}))
        try:
            rc = main({argv!r})
        finally:
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} and sys.modules[m] is not None)
            assert not loaded, loaded
        sys.exit(rc)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_config_typo_fails_at_config_load_on_a_base_install(tmp_path):
    """A typo or an out-of-range value in the config is reported on an install without torch (the config is read
    before the `train` extra is required): exit 2 naming the key, and no run.json; a valid config then stops at the
    missing extra, naming it."""
    run_dir = tmp_path / "run"
    done = _run_on_a_base_install(["run", "--config", EMBEDDED, "--run-dir", str(run_dir), "--report-dir",
                                   str(tmp_path / "rep"), "--set", "data.synth.anatomy_jiter=0.4"])
    assert done.returncode == 2, done.stderr
    assert "data.synth: unknown key 'anatomy_jiter'; valid keys:" in done.stderr and "anatomy_jitter" in done.stderr
    assert not (run_dir / "run.json").exists()
    done = _run_on_a_base_install(["run", "--config", EMBEDDED, "--run-dir", str(run_dir), "--set",
                                   "data.synth.lesion_fade=1.5"])
    assert done.returncode == 2 and "lesion_fade must be in [0, 1]" in done.stderr, done.stderr
    done = _run_on_a_base_install(["sweep", "--config", EMBEDDED, "--seeds", "0", "--set", "distill.stepz=3"])
    assert done.returncode == 2 and "unknown key 'stepz'" in done.stderr, done.stderr
    assert not run_dir.exists() or not (run_dir / "run.json").exists()
    done = _run_on_a_base_install(["run", "--config", EMBEDDED, "--run-dir", str(run_dir)])
    assert done.returncode == 1 and "needs the 'train' extra (torch" in done.stderr, done.stderr
    assert not run_dir.exists() or not (run_dir / "run.json").exists()


def test_lesion_haze_grows_with_grade_and_fades_with_difficulty():
    """The diffuse exudate tint: a whole-image colour shift proportional to the grade at difficulty 0, gone at
    difficulty 1 with lesion_fade 1 (the closed-book cue that hard exams lose)."""
    from dxrag.core.data.synth import SynthConfig, _Renderer

    cfg = SynthConfig(pixel_noise=0.0, lesion_haze=0.05, lesion_fade=1.0)
    renderer = _Renderer(cfg, np.random.default_rng(0))
    anatomy = np.zeros(cfg.anatomy_dims)

    def mean_shift(grade: int, difficulty: float) -> float:
        hazy = renderer.render(anatomy, 0, difficulty, np.random.default_rng(1), grade).astype(float)
        clear = renderer.render(anatomy, 0, difficulty, np.random.default_rng(1), 0).astype(float)
        return float((hazy - clear).mean())

    shifts = [mean_shift(g, 0.0) for g in range(len(GRADES))]
    assert shifts[0] == 0 and all(b > a + 1 for a, b in zip(shifts, shifts[1:])), shifts
    assert mean_shift(4, 1.0) == 0
    assert 0 < mean_shift(4, 0.5) < shifts[4]
