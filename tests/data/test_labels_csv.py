"""Tests of the label-table (VinDr-PCXR / BRSET style) converter on generated CSVs and PNG/JPEG folders."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest
from PIL import Image

from dxrag.core.data import labels_csv as lc
from dxrag.core.base.dataset import DatasetError, load_dataset

LABELS = ["No finding", "Bronchitis", "Pneumonia"]


def write_table(path: Path, rows: list[dict], header: list[str] | None = None) -> Path:
    header = header or list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


def make_folder(tmp_path: Path, n: int = 20, jpeg_every: int = 5) -> tuple[Path, Path, list[dict]]:
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(n):
        image_id = f"img{i:03d}"
        suffix = ".jpg" if i % jpeg_every == 0 else ".png"
        Image.new("L", (12, 12), color=i * 10).save(images / f"{image_id}{suffix}")
        bits = [int(i % 3 == 0), int(i % 2 == 1), int(i % 4 == 1)]
        rows.append({"image_id": image_id, "patient_id": f"p{i // 2}", **dict(zip(LABELS, bits))})
    return write_table(tmp_path / "labels.csv", rows), images, rows


def assert_nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_table_becomes_a_multilabel_dataset(tmp_path):
    table, images, rows = make_folder(tmp_path)
    out = lc.convert_labels_csv(table, images, tmp_path / "out", labels=LABELS, allow_empty=True,
                                group_column="patient_id", modality="pediatric chest X-ray")
    ds = load_dataset(out, decode_images=True)
    assert ds.meta.task == "multilabel" and ds.meta.labels == LABELS and ds.meta.allow_empty
    by_source = {q.metadata["source_image"]: q for q in ds.queries_by_id().values()}
    assert len(by_source) == len(rows)
    for row in rows:
        q = by_source[row["image_id"]]
        assert q.label_set == tuple(x for x in LABELS if row[x] == 1)
        assert q.candidates == tuple(LABELS) and q.metadata["group"] == row["patient_id"]
    empty = by_source["img002"]  # no column at 1
    assert empty.label_set == () and empty.label == "none"
    assert by_source["img001"].label == "Bronchitis, Pneumonia"
    # one patient's images share a split; the corpus is the train split, same files as the train queries
    split_of = {q.metadata["source_image"]: s for s, qs in ds.queries.items() for q in qs}
    for i in range(0, len(rows), 2):
        assert split_of[f"img{i:03d}"] == split_of[f"img{i + 1:03d}"]
    train = {q.metadata["source_image"]: q for q in ds.queries["train"]}
    assert {c.metadata["source_image"] for c in ds.corpus} == set(train)
    for c in ds.corpus:
        assert c.image == train[c.metadata["source_image"]].image and c.label == train[c.metadata["source_image"]].label
        assert c.text.startswith("Pediatric chest X-ray report. Findings:")
    assert ds.meta.extra["same_image_keys"] == ["source_image"]
    jpeg = next(q for q in ds.queries_by_id().values() if q.metadata["source_image"] == "img005")
    assert jpeg.image.endswith(".jpg")
    assert (ds.image_path(jpeg.image)).read_bytes() == (images / "img005.jpg").read_bytes()


def test_split_column_test_csv_and_cli(tmp_path):
    table, images, rows = make_folder(tmp_path, n=12)
    for i, row in enumerate(rows):
        row["split"] = ["train", "train", "validation", "test"][i % 4]
        row["No finding"] = int(not (row["Bronchitis"] or row["Pneumonia"]))
    write_table(table, rows)
    ds = load_dataset(lc.convert_labels_csv(table, images, tmp_path / "a", split_column="split",
                                            labels=LABELS))
    assert {s: len(q) for s, q in ds.queries.items()} == {"train": 6, "val": 3, "test": 3}
    assert not ds.meta.allow_empty
    # VinDr-PCXR ships train and test tables; every non-id column is a label when --labels is not given
    keep = ["image_id", *LABELS]
    write_table(tmp_path / "train.csv", [{k: r[k] for k in keep} for r in rows[:8]], keep)
    write_table(tmp_path / "test.csv", [{k: r[k] for k in keep} for r in rows[8:]], keep)
    parser = argparse.ArgumentParser()
    lc.add_arguments(parser)
    args = parser.parse_args(["--csv", str(tmp_path / "train.csv"), "--test-csv", str(tmp_path / "test.csv"),
                              "--images", str(images), "--out", str(tmp_path / "b"), "--question", "Findings?",
                              "--license", "PhysioNet credentialed"])
    assert lc.run(args) == 0
    ds = load_dataset(tmp_path / "b")
    assert ds.meta.labels == LABELS and len(ds.queries["test"]) == 4
    assert {q.metadata["source_image"] for q in ds.queries["test"]} == {r["image_id"] for r in rows[8:]}
    assert ds.queries["test"][0].question == "Findings?" and ds.meta.license == "PhysioNet credentialed"


@pytest.mark.parametrize("edit, opts, match", [
    (lambda rows: rows[3].update(Bronchitis="2"), {}, r"labels.csv:5: field 'Bronchitis': '2' is not 0 or 1"),
    (lambda rows: rows[2].update(image_id="img001"), {}, r"labels.csv:4: field 'image_id': duplicate image 'img001' "
                                                        r"\(first at .*labels.csv:3\)"),
    (lambda rows: rows[4].update(image_id="missing"), {}, r"labels.csv:6: field 'image_id': no image file for "
                                                         r"'missing'"),
    (lambda rows: None, {"allow_empty": False}, r"labels.csv:4: no label column is 1; pass --allow-empty"),
    (lambda rows: None, {"labels": ["Bronchitis", "Edema"]}, r"labels.csv:1: --labels \['Edema'\] not in the header"),
    (lambda rows: None, {"labels": None}, r"labels.csv:2: field 'patient_id': 'p0' is not 0 or 1 \(pass --labels"),
    (lambda rows: None, {"id_column": "file"}, r"labels.csv:1: missing column\(s\) \['file'\]"),
])
def test_bad_table_names_file_line_and_field(tmp_path, edit, opts, match):
    table, images, rows = make_folder(tmp_path)
    edit(rows)
    write_table(table, rows)
    kwargs = {"labels": LABELS, "allow_empty": True, **opts}
    with pytest.raises(DatasetError, match=match):
        lc.convert_labels_csv(table, images, tmp_path / "out", **kwargs)
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_image_that_does_not_decode_and_reserved_label(tmp_path):
    table, images, rows = make_folder(tmp_path)
    (images / "img003.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"labels.csv:5: field 'image_id': .*img003.png: image does not decode"):
        lc.convert_labels_csv(table, images, tmp_path / "out", labels=LABELS, allow_empty=True)
    assert_nothing_left(tmp_path, tmp_path / "out")
    for row in rows:
        row["none"] = row.pop("No finding")
    write_table(table, rows)
    with pytest.raises(DatasetError, match=r"labels.csv:1: field 'labels': 'none' is reserved"):
        lc.convert_labels_csv(table, images, tmp_path / "out", labels=["none", "Bronchitis"], allow_empty=True)
