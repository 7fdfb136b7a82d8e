"""Tests of the MedMNIST converter: the shared BreastMNIST and PneumoniaMNIST files, and bad generated npz files."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dxrag.core.data import medmnist as mm
from dxrag.core.base.dataset import DatasetError, load_dataset, sha256_file
from dxrag_test_support import SHARED_DATA


def shared_npz(flag: str) -> Path:
    path = SHARED_DATA / flag / f"{flag}.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present (set DXRAG_SHARED_DATA to the folder of the offline datasets)")
    return path


def write_npz(path: Path, sizes=(6, 2, 3), side: int = 28, n_classes: int = 2, rgb: bool = False, **override):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        shape = (n, side, side, 3) if rgb else (n, side, side)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % n_classes).reshape(n, 1).astype(np.uint8)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def assert_nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_breastmnist_from_shared_npz(tmp_path):
    npz = shared_npz("breastmnist")
    out = mm.convert_medmnist("breastmnist", tmp_path / "breast", npz=npz)
    ds = load_dataset(out, decode_images=True)
    assert len(ds.corpus) == 546
    assert {s: len(q) for s, q in ds.queries.items()} == {"train": 546, "val": 78, "test": 156}
    assert ds.meta.labels == ["yes", "no"]
    assert ds.meta.license == "CC BY 4.0"
    assert ds.meta.extra["npz_sha256"] == sha256_file(npz)
    assert ds.meta.extra["flag"] == "breastmnist"
    # class 0 = malignant -> "yes" (SOURCE.md class counts: train 147/399, test 42/114)
    assert Counter(q.label for q in ds.queries["train"]) == {"yes": 147, "no": 399}
    assert Counter(q.label for q in ds.queries["test"]) == {"yes": 42, "no": 114}
    assert Counter(c.label for c in ds.corpus) == {"yes": 147, "no": 399}
    assert all(c.metadata["class_name"] == ("malignant" if c.label == "yes" else "normal, benign") for c in ds.corpus)
    assert all("malignant" in c.text for c in ds.corpus if c.label == "yes")
    assert len({c.text for c in ds.corpus}) >= 6  # several phrasings per class, not one text per label
    q = ds.queries["val"][0]
    assert q.question.startswith("Does this breast ultrasound image show signs of cancer?")
    assert q.candidates == ("yes", "no")
    assert ds.load_image(q.image).mode == "RGB" and ds.load_image(q.image).size == (28, 28)
    # train queries and corpus items of the same image share the file and (source_split, source_index)
    corpus_by_index = {c.metadata["source_index"]: c for c in ds.corpus}
    for q in ds.queries["train"]:
        c = corpus_by_index[q.metadata["source_index"]]
        assert c.image == q.image and c.label == q.label
    with np.load(npz) as raw:
        first = raw["test_images"][0]
    assert np.array_equal(np.asarray(ds.load_image(ds.queries["test"][0].image))[..., 0], first)


def test_pneumoniamnist_column_labels(tmp_path):
    npz = shared_npz("pneumoniamnist")
    ds = load_dataset(mm.convert_medmnist("pneumoniamnist", tmp_path / "pneu", npz=npz, max_corpus=500))
    assert len(ds.corpus) == 500
    assert {s: len(q) for s, q in ds.queries.items()} == {"train": 3882, "val": 524, "test": 624}
    assert Counter(q.label for q in ds.queries["test"]) == {"no": 234, "yes": 390}  # 0 = normal, 1 = pneumonia


def test_seeded_corpus_subset_and_texts_are_deterministic(tmp_path):
    npz = write_npz(tmp_path / "f.npz", sizes=(40, 2, 2), side=28, n_classes=5, rgb=True)
    a = load_dataset(mm.convert_medmnist("retinamnist", tmp_path / "a", npz=npz, max_corpus=10, seed=3))
    b = load_dataset(mm.convert_medmnist("retinamnist", tmp_path / "b", npz=npz, max_corpus=10, seed=3))
    c = load_dataset(mm.convert_medmnist("retinamnist", tmp_path / "c", npz=npz, max_corpus=10, seed=4))
    assert [x.to_json() for x in a.corpus] == [x.to_json() for x in b.corpus]
    assert [x.id for x in a.corpus] != [x.id for x in c.corpus]
    assert a.meta.labels == ["0", "1", "2", "3", "4"]
    assert len(a.corpus) == 10 and len(a.queries["train"]) == 40
    assert all(f"grade {x.label}" in x.text for x in a.corpus)


def test_cli_arguments_and_run(tmp_path):
    npz = write_npz(tmp_path / "d.npz", n_classes=7, rgb=True)
    parser = argparse.ArgumentParser()
    mm.add_arguments(parser)
    argv = ["--flag", "dermamnist", "--npz", str(npz), "--out", str(tmp_path / "derma")]
    assert mm.run(parser.parse_args(argv)) == 0
    ds = load_dataset(tmp_path / "derma")
    assert len(ds.meta.labels) == 7 and "melanoma" in ds.meta.labels
    assert ds.meta.license == "CC BY-NC 4.0"
    assert all(name in ds.queries["test"][0].question for name in ds.meta.labels)
    with pytest.raises(DatasetError, match="already exists"):
        mm.run(parser.parse_args(argv))
    assert mm.run(parser.parse_args([*argv, "--overwrite"])) == 0


def test_every_table_flag_is_consistent():
    for flag, spec in mm.FLAGS.items():
        assert len(spec.class_names) == len(spec.answers) == len(spec.findings), flag
        assert len(set(spec.answers)) == len(spec.answers), flag


@pytest.mark.parametrize("flag, match", [("organmnist3d", "3D"),
                                         ("nosuchmnist", "unknown MedMNIST flag")])
def test_unsupported_flags(tmp_path, flag, match):
    with pytest.raises(DatasetError, match=match):
        mm.convert_medmnist(flag, tmp_path / "out", npz=write_npz(tmp_path / "x.npz"))
    assert_nothing_left(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("override, match", [
    ({"val_labels": None}, r"missing array 'val_labels'"),
    ({"train_images": np.zeros((6, 28, 28, 4), np.uint8)}, r"'train_images' has shape \(6, 28, 28, 4\)"),
    ({"test_images": np.zeros((3, 64, 64), np.uint8)}, r"'test_images' holds 64x64 images, expected 28x28"),
    ({"train_images": np.zeros((6, 28, 28), np.float32)}, r"'train_images' has dtype float32"),
    ({"val_labels": np.zeros((2, 3), np.uint8)}, r"'val_labels' .*multi-label"),
    ({"test_labels": np.zeros(4, np.uint8)}, r"'test_labels' has shape \(4,\), expected \(3,\)"),
    ({"train_labels": np.array([0, 1, 0, 2, 0, 1])}, r"'train_labels' entry 3: class 2 is outside 0\.\.1"),
])
def test_bad_npz_names_file_and_array(tmp_path, override, match):
    npz = write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DatasetError, match=match) as err:
        mm.convert_medmnist("breastmnist", tmp_path / "out", npz=npz)
    assert str(npz) in str(err.value)
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_npz_that_does_not_decode(tmp_path):
    npz = tmp_path / "broken.npz"
    npz.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(DatasetError, match="not a readable npz archive") as err:
        mm.convert_medmnist("breastmnist", tmp_path / "out", npz=npz)
    assert str(npz) in str(err.value)
    with pytest.raises(DatasetError, match="file not found"):
        mm.convert_medmnist("breastmnist", tmp_path / "out", npz=tmp_path / "absent.npz")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_download_without_medmnist_package_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # makes `import medmnist` fail
    with pytest.raises(DatasetError, match="pip install medmnist") as err:
        mm.convert_medmnist("breastmnist", tmp_path / "out")
    assert "--npz" in str(err.value)
    assert_nothing_left(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------ multi-label ChestMNIST, legends


def write_chest_npz(path: Path, sizes=(8, 3, 3), n_findings: int = 14, **override) -> Path:
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (rng.random((n, n_findings)) < 0.2).astype(np.uint8)
        labels[0] = 0  # a "no finding" image in every split
        labels[1, [2, 4]] = 1  # effusion + mass
        arrays[f"{split}_labels"] = labels
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_chestmnist_is_a_multilabel_task(tmp_path):
    npz = write_chest_npz(tmp_path / "chestmnist.npz")
    ds = load_dataset(mm.convert_medmnist("chestmnist", tmp_path / "chest", npz=npz), decode_images=True)
    assert ds.meta.task == "multilabel" and ds.meta.allow_empty is True
    assert ds.meta.labels == list(mm.chest_names()) and len(ds.meta.labels) == 14 and not ds.meta.legend
    with np.load(npz) as raw:
        truth = {split: raw[f"{split}_labels"] for split in ("train", "val", "test")}
    for split, qs in ds.queries.items():
        assert len(qs) == len(truth[split])
        for q in qs:
            row = truth[split][q.metadata["source_index"]]
            assert q.label_set == tuple(ds.meta.labels[k] for k in np.flatnonzero(row))
            assert q.candidates == tuple(ds.meta.labels)
    q0, q1 = ds.queries["test"][:2]
    assert (q0.label_set, q0.label) == ((), "none")
    assert {"effusion", "mass"} <= set(q1.label_set) and q1.label.startswith(q1.label_set[0])
    assert "Which of these findings are present" in q0.question
    item = next(c for c in ds.corpus if c.metadata["source_index"] == 0)
    assert "no finding" in item.text and item.label == "none"
    item = next(c for c in ds.corpus if c.metadata["source_index"] == 1)
    assert "effusion" in item.text and item.label == ds.queries["train"][1].label


def test_chestmnist_names_from_medmnist_info_when_installed(monkeypatch):
    import types

    info = {"chestmnist": {"label": {str(i): f"Finding{i}" for i in range(14)}}}
    monkeypatch.setitem(sys.modules, "medmnist", types.SimpleNamespace(INFO=info))
    assert mm.chest_names()[:2] == ("finding0", "finding1")
    monkeypatch.setitem(sys.modules, "medmnist", None)
    assert mm.chest_names() == mm.CHEST_NAMES


@pytest.mark.parametrize("override, match", [
    ({"val_labels": np.zeros((3, 13), np.uint8)}, r"'val_labels' has shape \(3, 13\), expected \(3, 14\)"),
    ({"test_labels": np.full((3, 14), 2, np.uint8)}, r"'test_labels' entry \[0, 0\] \(atelectasis\): value 2"),
])
def test_bad_chest_npz(tmp_path, override, match):
    npz = write_chest_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DatasetError, match=match):
        mm.convert_medmnist("chestmnist", tmp_path / "out", npz=npz)
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_legend_defaults_and_numbered_answers(tmp_path):
    npz = write_npz(tmp_path / "r.npz", n_classes=5, rgb=True)
    retina = load_dataset(mm.convert_medmnist("retinamnist", tmp_path / "retina", npz=npz))
    assert retina.meta.legend["0"] == "No diabetic retinopathy" and list(retina.meta.legend) == retina.meta.labels
    assert not load_dataset(mm.convert_medmnist("retinamnist", tmp_path / "r2", npz=npz, legend="off")).meta.legend
    npz = write_npz(tmp_path / "d.npz", n_classes=7, rgb=True)
    derma = load_dataset(mm.convert_medmnist("dermamnist", tmp_path / "derma", npz=npz))
    assert not derma.meta.legend  # names as answers: the options already say what each answer means
    numbered = load_dataset(mm.convert_medmnist("dermamnist", tmp_path / "dn", npz=npz, numbered=True))
    assert numbered.meta.labels == [str(i) for i in range(7)]
    assert numbered.meta.legend["4"] == "melanoma"
    q = numbered.queries["train"][3]
    assert q.label == "3" and q.metadata["class_name"] == "dermatofibroma"
    breast = load_dataset(mm.convert_medmnist("breastmnist", tmp_path / "b", npz=write_npz(tmp_path / "b.npz"),
                                              legend="on"))
    assert breast.meta.legend == {"yes": "malignant", "no": "normal, benign"}


def test_legend_renders_as_the_reference_prompt():
    from dxrag.core.reader.prompts import with_legend

    text = with_legend("What type of skin lesion does the patient have?", {"0": "melanoma", "1": "nevus"})
    assert text == ("Provide answer according to the labels:\n0 - 'melanoma'\n1 - 'nevus'\n\n"
                    "What type of skin lesion does the patient have?")
    assert with_legend("q?", {}) == "q?"
