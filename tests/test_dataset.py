"""The dataset-directory format: loading, validation errors that name file/line/field, atomic writing."""

from __future__ import annotations

import json
import shutil

import pytest

from dxrag.core.dataset import DatasetError, DatasetWriter, DatasetMeta, load_dataset
from dxrag.core.records import CorpusItem, Query


def _write_small(out, n=3, **overrides):
    from PIL import Image

    with DatasetWriter(out, overwrite=overrides.pop("overwrite", False)) as w:
        for i in range(n):
            rel = w.add_image(f"c{i}", Image.new("RGB", (8, 8), (i * 40, 0, 0)))
            w.corpus.append(CorpusItem(id=f"c{i}", image=rel, text=f"record {i}", label="yes"))
            rel = w.add_image(f"q{i}", Image.new("RGB", (8, 8), (0, i * 40, 0)))
            w.queries["test"].append(Query(id=f"q{i}", image=rel, question="sick?", candidates=("yes", "no"),
                                           label="no"))
        w.meta = DatasetMeta(name="tiny", task="classification", labels=["yes", "no"])
    return out


@pytest.fixture()
def tiny(tmp_path):
    return _write_small(tmp_path / "ds")


def _rewrite_line(path, lineno, mutate):
    lines = path.read_text().splitlines()
    obj = json.loads(lines[lineno - 1])
    mutate(obj)
    lines[lineno - 1] = json.dumps(obj)
    path.write_text("\n".join(lines) + "\n")


def _load_unchecked(path):
    return load_dataset(path, verify_checksums=False, decode_images=True)


def test_roundtrip(tiny):
    ds = load_dataset(tiny, decode_images=True)
    assert [c.id for c in ds.corpus] == ["c0", "c1", "c2"]
    assert ds.queries["test"][1].candidates == ("yes", "no")
    assert ds.load_image(ds.corpus[1].image).getpixel((0, 0)) == (40, 0, 0)


@pytest.mark.parametrize(
    "file, line, mutate, message",
    [
        ("corpus.jsonl", 2, lambda o: o.pop("text"), "missing required field 'text'"),
        ("corpus.jsonl", 3, lambda o: o.update(text=5), "field 'text' must be str"),
        ("corpus.jsonl", 3, lambda o: o.update(id="c0"), "duplicate id 'c0'"),
        ("queries-test.jsonl", 2, lambda o: o.update(label="maybe"), "field 'label': 'maybe' is not in the label set"),
        ("queries-test.jsonl", 1, lambda o: o.update(candidates=["yes", 3]), "field 'candidates'[1] must be str"),
        ("queries-test.jsonl", 3, lambda o: o.update(image="images/nope.png"), "field 'image': file"),
    ],
)
def test_bad_records_name_file_line_field(tiny, file, line, mutate, message):
    _rewrite_line(tiny / file, line, mutate)
    with pytest.raises(DatasetError) as err:
        _load_unchecked(tiny)
    assert f"{file}:{line}" in str(err.value)
    assert message in str(err.value)


def test_image_that_does_not_decode(tiny):
    (tiny / "images" / "c1.png").write_bytes(b"not a png")
    load_dataset(tiny)  # existence is checked by default; decoding on request
    with pytest.raises(DatasetError, match=r"corpus.jsonl:2: field 'image'.*does not decode"):
        _load_unchecked(tiny)


def test_invalid_json_line(tiny):
    with open(tiny / "corpus.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(DatasetError, match=r"corpus.jsonl:4: not valid JSON"):
        _load_unchecked(tiny)


def test_checksum_mismatch_is_reported(tiny):
    _rewrite_line(tiny / "corpus.jsonl", 1, lambda o: o.update(text="edited"))
    with pytest.raises(DatasetError, match="sha256 differs"):
        load_dataset(tiny)


def test_duplicate_query_ids_across_splits(tmp_path):
    from PIL import Image

    with pytest.raises(DatasetError, match="duplicate query id 'q0'"):
        with DatasetWriter(tmp_path / "dup") as w:
            rel = w.add_image("c0", Image.new("RGB", (4, 4)))
            w.corpus.append(CorpusItem(id="c0", image=rel, text="t"))
            for split in ("train", "test"):
                w.queries[split].append(Query(id="q0", image=rel, question="?", candidates=("a", "b"), label="a"))
            w.meta = DatasetMeta(name="d", task="classification", labels=["a", "b"])
    assert not (tmp_path / "dup").exists(), "a rejected dataset is never published"
    assert list(tmp_path.iterdir()) == [], "no temporary directory left behind"


def test_writer_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path / "x"):
            raise RuntimeError("converter crashed")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_then_replaced(tiny):
    with pytest.raises(DatasetError, match="already exists"):
        _write_small(tiny)
    _write_small(tiny, n=2, overwrite=True)
    assert len(load_dataset(tiny).corpus) == 2


def test_open_vqa_questions_keep_free_answers(tmp_path):
    from PIL import Image

    with DatasetWriter(tmp_path / "vqa") as w:
        rel = w.add_image("i0", Image.new("RGB", (4, 4)))
        w.corpus.append(CorpusItem(id="c0", image=rel, text="t"))
        w.queries["test"].append(Query(id="q0", image=rel, question="where?", candidates=(), label="left lung",
                                       metadata={"answer_type": "open"}))
        w.meta = DatasetMeta(name="v", task="vqa", labels=["yes", "no"])
    assert load_dataset(tmp_path / "vqa").queries["test"][0].label == "left lung"


def test_missing_meta_file(tiny):
    (tiny / "dataset.yaml").unlink()
    with pytest.raises(DatasetError, match="dataset.yaml: file not found"):
        load_dataset(tiny)


def test_cli_synth_and_validate(tmp_path, capsys):
    from dxrag.core.cli import main

    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--seed", "2", "--set", "n_patients=10", "--set", "n_corpus=30",
                 "--set", "n_train=5", "--set", "n_val=5", "--set", "n_test=5"]) == 0
    assert "corpus 30" in capsys.readouterr().out
    assert main(["data", "validate", str(out)]) == 0
    shutil.copy(out / "images" / "q000000.png", out / "images" / "c000001.png")
    (out / "images" / "c000002.png").write_bytes(b"")
    assert main(["data", "validate", str(out)]) == 2
    assert "c000002.png" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(out)]) == 2  # exists, not overwritten
