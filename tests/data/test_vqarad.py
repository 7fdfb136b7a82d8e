"""Tests of the VQA-RAD (MEVF layout) converter: the shared folder, and bad input on generated json/image files."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dxrag.core.data import vqarad
from dxrag.core.cli import main
from dxrag.core.base.dataset import DatasetError, load_dataset
from dxrag_test_support import shared_vqarad


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = shared_vqarad()
    out = vqarad.convert_vqarad(root, tmp_path_factory.mktemp("vqarad") / "vqa-rad")
    ds = load_dataset(out)  # decode_images=True would decode each shared image once per question
    for rel in {c.image for c in ds.corpus} | {q.image for qs in ds.queries.values() for q in qs}:
        ds.load_image(rel)
    return root, ds


def test_vqarad_counts_and_label_set(converted):
    root, ds = converted
    train = json.loads((root / "trainset.json").read_text())
    test = json.loads((root / "testset.json").read_text())
    assert ds.meta.task == "vqa" and ds.meta.labels == ["yes", "no"]
    assert ds.meta.license == "CC0 1.0"
    assert len(ds.queries["train"]) + len(ds.queries["val"]) == len(train) == 3064
    assert len(ds.queries["test"]) == len(test) == 451
    assert {s: len(q) for s, q in ds.queries.items()} == {"train": 2965, "val": 99, "test": 451}
    assert len(ds.corpus) == 100

    def yes_no(entries):
        return sum(e["answer_type"].strip() == "CLOSED" and str(e["answer"]).strip().lower() in ("yes", "no")
                   for e in entries)

    closed = Counter((s, q.metadata["answer_type"]) for s, qs in ds.queries.items() for q in qs)
    assert closed["train", "closed"] + closed["val", "closed"] == yes_no(train) == 1713
    assert closed["test", "closed"] == yes_no(test) == 251
    assert closed["test", "open"] == 200  # 179 open + 21 closed questions with other answers
    for q in (q for qs in ds.queries.values() for q in qs):
        assert q.label == q.label.strip().lower()
        if q.metadata["answer_type"] == "closed":
            assert q.candidates == ("yes", "no") and q.label in ("yes", "no")
        else:
            assert q.candidates == () and q.label not in ("yes", "no")


def test_no_corpus_image_is_an_evaluation_image(converted):
    root, ds = converted
    test_names = {e["image_name"] for e in json.loads((root / "testset.json").read_text())}
    source_test_hashes = {sha256(root / "images" / name) for name in test_names}
    corpus_hashes = {sha256(ds.image_path(c.image)) for c in ds.corpus}
    assert len(corpus_hashes) == len(ds.corpus)
    assert not corpus_hashes & source_test_hashes
    assert not {c.metadata["source_image"] for c in ds.corpus} & test_names
    for split in ("val", "test"):
        assert not {c.image for c in ds.corpus} & {q.image for q in ds.queries[split]}
    # val is split off train by image
    assert not {q.image for q in ds.queries["val"]} & {q.image for q in ds.queries["train"]}
    assert sorted({q.metadata["source_image"] for q in ds.queries["val"]}) == ds.meta.extra["val_images"]
    # copied byte for byte, and train queries on corpus images can be matched to them
    item = ds.corpus[0]
    assert sha256(ds.image_path(item.image)) == sha256(root / "images" / item.metadata["source_image"])
    same = [q for q in ds.queries["train"] if q.metadata["source_image"] == item.metadata["source_image"]]
    assert same and all(q.image == item.image for q in same)
    assert item.metadata["n_qa"] == len(same)
    assert all(q.metadata["image_in_test"] == (q.metadata["source_image"] in test_names) for q in ds.queries["train"])


def test_corpus_text_states_the_answers(converted):
    _, ds = converted
    by_image = {c.metadata["source_image"]: c for c in ds.corpus}
    q = next(q for q in ds.queries["train"] if q.metadata["source_image"] in by_image
             and q.metadata["answer_type"] == "open")
    text = by_image[q.metadata["source_image"]].text
    assert q.question.rstrip("?") in text and f" {q.label}." in text
    assert text.split()[0] in ("Head", "Chest", "Abdominal")


# ------------------------------------------------------------------------------------------ generated bad input


def make_root(tmp_path: Path, n_images: int = 4) -> Path:
    root = tmp_path / "rad"
    (root / "images").mkdir(parents=True)
    for i in range(n_images):
        Image.new("L", (16, 16), color=i * 40).save(root / "images" / f"synpic{i}.jpg", format="JPEG")
    train = [qa(1, 0, "yes", "CLOSED"), qa(2, 1, "no", "CLOSED"), qa(3, 2, "ct", "OPEN"), qa(4, 3, "left", "CLOSED"),
             qa(5, 3, " Yes ", "CLOSED ")]
    write(root / "trainset.json", train)
    write(root / "testset.json", [qa(10, 0, "no", "CLOSED"), qa(11, 0, 4, "OPEN")])
    return root


def qa(qid: int, image: int, answer, answer_type: str) -> dict:
    return {"qid": qid, "image_name": f"synpic{image}.jpg", "image_organ": "HEAD", "answer": answer,
            "answer_type": answer_type, "question_type": "PRES", "question": f"Question {qid}?",
            "phrase_type": "freeform"}


def write(path: Path, entries) -> None:
    path.write_text(json.dumps(entries, indent=1))


def assert_nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_small_generated_folder(tmp_path):
    root = make_root(tmp_path)
    assert main(["data", "vqa-rad", "--root", str(root), "--out", str(tmp_path / "out")]) == 0
    ds = load_dataset(tmp_path / "out", decode_images=True)
    # image 0 is a test image; of the train-only images 1..3 one goes to val, the other two form the corpus
    assert len(ds.corpus) == 2 and len(ds.queries["val"]) >= 1
    assert "synpic0.jpg" not in {c.metadata["source_image"] for c in ds.corpus}
    queries = ds.queries_by_id()
    assert queries["q5"].label == "yes" and queries["q5"].metadata["answer_type"] == "closed"
    assert (queries["q4"].metadata["answer_type"], queries["q4"].metadata["source_answer_type"]) == ("open", "closed")
    assert queries["q11"].label == "4" and queries["q11"].candidates == ()
    assert ds.meta.extra["answer_vocabulary"] is None  # no answer_all_list.json in this folder


@pytest.mark.parametrize("edit, match", [
    (lambda e: e[1].pop("answer"), r"trainset.json: entry 1 \(qid 2\): missing field 'answer'"),
    (lambda e: e[2].update(question=["x"]), r"trainset.json: entry 2 \(qid 3\): field 'question' must be str"),
    (lambda e: e[0].update(answer_type="MAYBE"), r"entry 0 \(qid 1\): field 'answer_type': 'MAYBE' is not CLOSED"),
    (lambda e: e[3].update(image_name="synpic9.jpg"), r"entry 3 \(qid 4\): field 'image_name': 'synpic9.jpg' is not"),
    (lambda e: e[4].update(qid=10), r"entry 0 \(qid 10\): field 'qid': duplicate qid \(first at .*entry 4"),
])
def test_bad_json_entry_names_file_entry_and_field(tmp_path, edit, match):
    root = make_root(tmp_path)
    entries = json.loads((root / "trainset.json").read_text())
    edit(entries)
    write(root / "trainset.json", entries)
    with pytest.raises(DatasetError, match=match):
        vqarad.convert_vqarad(root, tmp_path / "out")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_image_that_does_not_decode(tmp_path):
    root = make_root(tmp_path)
    (root / "images" / "synpic2.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DatasetError, match=r"trainset.json: entry 2 \(qid 3\): field 'image_name': .*does not decode"):
        vqarad.convert_vqarad(root, tmp_path / "out")
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_invalid_json_names_line(tmp_path):
    root = make_root(tmp_path)
    (root / "testset.json").write_text('[\n{"qid": 10,\n "answer": }\n]')
    with pytest.raises(DatasetError, match=r"testset.json:3: not valid JSON"):
        vqarad.convert_vqarad(root, tmp_path / "out")
    (root / "testset.json").unlink()
    with pytest.raises(DatasetError, match=r"testset.json: file not found"):
        vqarad.convert_vqarad(root, tmp_path / "out")
    assert_nothing_left(tmp_path, tmp_path / "out")
