"""Tests of the public VQA layouts: Hugging Face parquet / save_to_disk folders and SLAKE's json layout, on generated
fixtures, plus the shared VQA-RAD folder rewritten as Hugging Face parquet."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dxrag.core.data import vqa_layouts as vl
from dxrag.core.cli import main
from dxrag.core.base.dataset import DatasetError, load_dataset
from dxrag_test_support import shared_vqarad
from dxrag.core.stages import same_image_exclusions


def png(shade: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (shade, 255 - shade, 0)).save(buf, format=fmt)
    return buf.getvalue()


def hf_table(rows: list[tuple[int, str, str]], **extra_columns) -> pa.Table:
    """(image shade, question, answer) rows as a datasets-style table: image = struct {bytes, path}."""
    images = [{"bytes": png(s), "path": f"img{s}.png"} for s, _, _ in rows]
    cols = {"image": images, "question": [q for _, q, _ in rows], "answer": [a for _, _, a in rows], **extra_columns}
    return pa.table(cols)


TRAIN = [(0, "Is there a mass?", "yes"), (0, "Which organ?", "Liver"), (10, "Is it normal?", "No"),
         (20, "What modality?", "ct"), (30, "Is it enlarged?", "yes"), (40, "Where?", "left lobe"),
         (50, "Is there fluid?", "no")]
TEST = [(0, "Is the liver shown?", "yes"), (60, "What organ?", "kidney")]


def write_hub(root: Path, splits: dict[str, pa.Table]) -> Path:
    (root / "data").mkdir(parents=True)
    for split, table in splits.items():
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_hub_parquet_without_val_split(tmp_path):
    root = write_hub(tmp_path / "vqa-rad", {"train": hf_table(TRAIN), "test": hf_table(TEST)})
    ds = load_dataset(vl.convert_hf(root, tmp_path / "out"), decode_images=True)
    assert ds.meta.name == "vqa-rad" and ds.meta.task == "vqa" and ds.meta.license == "CC0 1.0"
    assert len(ds.queries["train"]) + len(ds.queries["val"]) == len(TRAIN) and len(ds.queries["test"]) == 2
    qs = list(ds.queries_by_id().values())
    for q in qs:
        if q.label in ("yes", "no"):
            assert q.metadata["answer_type"] == "closed" and q.candidates == ("yes", "no")
        else:
            assert q.metadata["answer_type"] == "open" and q.candidates == ()
    assert {q.label for q in qs if q.answer_type == "open"} == {"liver", "ct", "left lobe", "kidney"}
    # the image of shade 0 is used by the test split: never in the corpus, found by its bytes
    test_keys = {q.metadata["source_image"] for q in ds.queries["test"]}
    assert hashlib.sha256(png(0)).hexdigest() in test_keys
    assert not test_keys & {c.metadata["source_image"] for c in ds.corpus}
    assert not {q.metadata["source_image"] for q in ds.queries["val"]} & {c.metadata["source_image"]
                                                                         for c in ds.corpus}
    # train queries on corpus images exclude their own image's item
    excl = same_image_exclusions(ds, ds.queries["train"])
    for q, ex in zip(ds.queries["train"], excl):
        own = [c.id for c in ds.corpus if c.metadata["source_image"] == q.metadata["source_image"]]
        assert ex == set(own)
    assert any(excl)
    item = ds.corpus[0]
    assert item.text.startswith("Radiology image.") and ds.image_path(item.image).suffix == ".png"
    assert ds.image_path(item.image).read_bytes() in {png(s) for s, _, _ in TRAIN}


def test_save_to_disk_arrow_with_validation_and_language(tmp_path):
    root = tmp_path / "slake-hf"
    lang = {"train": ["en"] * 6 + ["zh"], "validation": ["en", "en"], "test": ["en", "zh"]}
    tables = {"train": hf_table(TRAIN[:6] + [(70, "这是什么?", "肝")], q_lang=lang["train"],
                                answer_type=["CLOSED", "OPEN", "CLOSED", "OPEN", "OPEN", "OPEN", "OPEN"]),
              "validation": hf_table([(80, "Is it CT?", "yes"), (80, "Where?", "chest")], q_lang=lang["validation"],
                                     answer_type=["CLOSED", "OPEN"]),
              "test": hf_table(TEST, q_lang=lang["test"], answer_type=["CLOSED", "OPEN"])}
    for split, table in tables.items():
        (root / split).mkdir(parents=True)
        with pa.ipc.new_stream(str(root / split / "data-00000-of-00001.arrow"), table.schema) as writer:
            writer.write_table(table)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(tables)}))
    parser = argparse.ArgumentParser()
    vl.add_hf_arguments(parser)
    assert vl.run_hf(parser.parse_args(["--root", str(root), "--out", str(tmp_path / "o"), "--name", "slake"])) == 0
    ds = load_dataset(tmp_path / "o")
    assert {s: len(q) for s, q in ds.queries.items()} == {"train": 6, "val": 2, "test": 1}
    assert ds.meta.extra["other_language_rows_dropped"] == 2
    by_q = {q.question: q for q in ds.queries_by_id().values()}
    # "yes" to an OPEN question stays open (the source's type wins), a CLOSED yes/no question is closed
    assert by_q["Is it enlarged?"].answer_type == "open" and by_q["Is it enlarged?"].label == "yes"
    assert by_q["Is there a mass?"].answer_type == "closed"
    assert ds.meta.extra["val_images"] == "the source's own validation split"
    assert hashlib.sha256(png(80)).hexdigest() not in {c.metadata["source_image"] for c in ds.corpus}


@pytest.mark.parametrize("table, match", [
    (pa.table({"image": [{"bytes": png(1), "path": None}], "question": ["q?"]}),
     r"train-00000-of-00001.parquet: missing column\(s\) \['answer'\] \(has \['image', 'question'\]\)"),
    (pa.table({"image": [{"bytes": png(1), "path": None}] * 2, "question": ["q?", "r?"], "answer": ["yes", " "]}),
     r"train-00000-of-00001.parquet: row 1: field 'answer' is empty"),
    (pa.table({"image": [{"bytes": b"junk", "path": None}], "question": ["q?"], "answer": ["yes"]}),
     r"row 0: field 'image': image does not decode"),
    (pa.table({"image": [{"bytes": None, "path": "gone.png"}], "question": ["q?"], "answer": ["yes"]}),
     r"row 0: field 'image': no image bytes"),
    (pa.table({"image": [{"bytes": png(1), "path": None}], "question": ["q?"], "answer": ["yes"],
               "answer_type": ["MAYBE"]}), r"row 0: field 'answer_type': 'MAYBE' is not CLOSED or OPEN"),
])
def test_bad_hf_rows(tmp_path, table, match):
    root = write_hub(tmp_path / "bad", {"train": table, "test": hf_table(TEST)})
    with pytest.raises(DatasetError, match=match):
        vl.convert_hf(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_hf_folder_problems(tmp_path):
    with pytest.raises(DatasetError, match="no .parquet or .arrow files"):
        (tmp_path / "empty").mkdir()
        vl.convert_hf(tmp_path / "empty", tmp_path / "out")
    root = tmp_path / "odd"
    root.mkdir()
    pq.write_table(hf_table(TEST), root / "shard0.parquet")
    with pytest.raises(DatasetError, match=r"cannot tell the split of \['shard0.parquet'\]"):
        vl.convert_hf(root, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- SLAKE json


def slake_entry(qid, img, question, answer, answer_type, lang="en"):
    return {"img_id": int(img[-1]), "img_name": f"xmlab{img[-1]}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": "Abdomen", "modality": "CT", "answer_type": answer_type,
            "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}


def make_slake(tmp_path: Path) -> Path:
    root = tmp_path / "Slake1.0"
    for i in range(6):
        (root / "imgs" / f"xmlab{i}").mkdir(parents=True)
        Image.new("RGB", (12, 12), (i * 30, 0, 0)).save(root / "imgs" / f"xmlab{i}" / "source.jpg", format="JPEG")
    files = {
        "train.json": [slake_entry(1, "x0", "Is this a CT?", "Yes", "CLOSED"),
                       slake_entry(2, "x0", "Which organ is abnormal?", "Liver", "OPEN"),
                       slake_entry(3, "x1", "这是什么?", "肝脏", "OPEN", lang="zh"),
                       slake_entry(4, "x1", "Which is bigger, left or right kidney?", "Left Kidney", "CLOSED"),
                       slake_entry(5, "x2", "Is it normal?", "No", "CLOSED")],
        "validate.json": [slake_entry(6, "x3", "Where is the liver?", "Upper left", "OPEN")],
        "test.json": [slake_entry(7, "x4", "Is there a tumor?", "no", "CLOSED"),
                      slake_entry(8, "x5", "How many kidneys?", 2, "OPEN")],
    }
    for name, entries in files.items():
        (root / name).write_text(json.dumps(entries, ensure_ascii=False, indent=1))
    return root


def test_slake_json_layout(tmp_path):
    root = make_slake(tmp_path)
    assert main(["data", "slake", "--root", str(root), "--out", str(tmp_path / "slake")]) == 0
    ds = load_dataset(tmp_path / "slake", decode_images=True)
    q = ds.queries_by_id()
    assert set(q) == {"q1", "q2", "q4", "q5", "q6", "q7", "q8"}  # the Chinese question is dropped
    assert ds.meta.extra["other_language_rows_dropped"] == 1
    assert (q["q1"].answer_type, q["q1"].label, q["q1"].candidates) == ("closed", "yes", ("yes", "no"))
    # a CLOSED question whose answer is not yes/no is kept as an open question with its free-text answer
    assert (q["q4"].answer_type, q["q4"].label, q["q4"].metadata["source_answer_type"]) == ("open", "left kidney",
                                                                                           "closed")
    assert q["q8"].label == "2" and q["q6"].metadata["location"] == "Abdomen"
    assert {s: len(x) for s, x in ds.queries.items()} == {"train": 4, "val": 1, "test": 2}
    assert sorted(c.metadata["source_image"] for c in ds.corpus) == [f"xmlab{i}/source.jpg" for i in range(3)]
    item = next(c for c in ds.corpus if c.metadata["source_image"] == "xmlab0/source.jpg")
    assert item.text.startswith("Abdomen CT image.") and "Which organ is abnormal? liver." in item.text
    assert ds.image_path(item.image).read_bytes() == (root / "imgs" / "xmlab0" / "source.jpg").read_bytes()
    assert same_image_exclusions(ds, [q["q1"], q["q7"]]) == [{item.id}, set()]


@pytest.mark.parametrize("edit, match", [
    (lambda e: e["train.json"][0].pop("answer"), r"train.json: entry 0 \(qid 1\): missing field 'answer'"),
    (lambda e: e["train.json"][1].update(answer_type="Free"), r"entry 1 \(qid 2\): field 'answer_type': 'Free'"),
    (lambda e: e["test.json"][0].update(qid=1), r"test.json: entry 0 \(qid 1\): field 'qid': duplicate qid"),
    (lambda e: e["train.json"][4].update(img_name="xmlab9/source.jpg"), r"entry 4 \(qid 5\): field 'img_name': .*"
                                                                        r"image file not found"),
    (lambda e: e["train.json"][4].update(img_name="../../etc/passwd"), r"field 'img_name': '../../etc/passwd' is "
                                                                       r"not a relative path"),
])
def test_bad_slake_entries(tmp_path, edit, match):
    root = make_slake(tmp_path)
    entries = {n: json.loads((root / n).read_text()) for n in ("train.json", "validate.json", "test.json")}
    edit(entries)
    for n, e in entries.items():
        (root / n).write_text(json.dumps(e, ensure_ascii=False))
    with pytest.raises(DatasetError, match=match):
        vl.convert_slake(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_slake_missing_file(tmp_path):
    root = make_slake(tmp_path)
    (root / "test.json").unlink()
    with pytest.raises(DatasetError, match=r"test.json: file not found; a SLAKE folder holds"):
        vl.convert_slake(root, tmp_path / "out")


# ------------------------------------------------------------------------- shared VQA-RAD as Hugging Face parquet


def test_shared_vqarad_as_hub_parquet(tmp_path):
    root = shared_vqarad()
    hub = tmp_path / "vqa-rad"
    (hub / "data").mkdir(parents=True)
    for split, name in (("train", "trainset.json"), ("test", "testset.json")):
        entries = json.loads((root / name).read_text())
        table = pa.table({"image": [{"bytes": (root / "images" / e["image_name"]).read_bytes(),
                                     "path": e["image_name"]} for e in entries],
                          "question": [e["question"] for e in entries],
                          "answer": [str(e["answer"]) for e in entries]})
        pq.write_table(table, hub / "data" / f"{split}-00000-of-00001.parquet")
    ds = load_dataset(vl.convert_hf(hub, tmp_path / "out"))
    assert len(ds.queries["train"]) + len(ds.queries["val"]) == 3064 and len(ds.queries["test"]) == 451
    # the HF layout has no answer_type: a yes/no answer makes a closed question; on VQA-RAD that gives exactly the
    # MEVF json's closed yes/no questions (1713 train, 251 test; tests/data/test_vqarad.py)
    assert sum(q.answer_type == "closed" for q in ds.queries["test"]) == 251
    assert sum(q.answer_type == "closed" for s in ("train", "val") for q in ds.queries[s]) == 1713
    assert len(ds.corpus) == 100
    test_keys = {q.metadata["source_image"] for q in ds.queries["test"]}
    assert not test_keys & {c.metadata["source_image"] for c in ds.corpus}
    n_images = len({hashlib.sha256((root / "images" / e["image_name"]).read_bytes()).hexdigest()
                    for n in ("trainset.json", "testset.json") for e in json.loads((root / n).read_text())})
    assert len(ds.corpus) + len({q.metadata["source_image"] for q in ds.queries["val"]}) + len(test_keys) == n_images
