"""The dataset-directory format: loading, validation errors that name file/line/field, atomic writing."""

from __future__ import annotations

import json
import shutil

import pytest

from dxrag.core.base.dataset import DatasetError, DatasetWriter, DatasetMeta, load_dataset
from dxrag.core.base.records import CorpusItem, Query


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


# ------------------------------------------------------------------------------------ multilabel, open VQA, legend

FINDINGS = ["effusion", "mass", "nodule"]


def _write_multilabel(out, allow_empty=True, sets=(("mass",), ("effusion", "nodule"), ())):
    from PIL import Image

    with DatasetWriter(out) as w:
        rel = w.add_image("c0", Image.new("RGB", (4, 4)))
        w.corpus.append(CorpusItem(id="c0", image=rel, text="Findings: mass.", label="mass"))
        for i, members in enumerate(sets):
            rel = w.add_image(f"q{i}", Image.new("RGB", (4, 4), (i, 0, 0)))
            w.queries["test"].append(Query(id=f"q{i}", image=rel, question="Which findings?",
                                           candidates=tuple(FINDINGS), label="", label_set=tuple(members)))
        w.meta = DatasetMeta(name="ml", task="multilabel", labels=list(FINDINGS), allow_empty=allow_empty)
    return out


def test_multilabel_roundtrip_and_canonical_label(tmp_path):
    out = _write_multilabel(tmp_path / "ml")
    first = json.loads((out / "queries-test.jsonl").read_text().splitlines()[1])
    assert first["label"] == ["effusion", "nodule"] and "label_set" not in first
    ds = load_dataset(out)
    assert ds.meta.task == "multilabel" and ds.meta.allow_empty is True
    q = ds.queries["test"]
    assert [x.label_set for x in q] == [("mass",), ("effusion", "nodule"), ()]
    assert [x.label for x in q] == ["mass", "effusion, nodule", "none"]
    # the file's order does not matter: the set is stored in label-set order
    _rewrite_line(out / "queries-test.jsonl", 2, lambda o: o.update(label=["nodule", "effusion"]))
    assert load_dataset(out, verify_checksums=False).queries["test"][1].label == "effusion, nodule"


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.update(label=["mass", "cardiomegaly"]), "field 'label': ['cardiomegaly'] not in the label set"),
    (lambda o: o.update(label=["mass", "mass"]), "field 'label': ['mass'] listed more than once"),
    (lambda o: o.update(label="mass"), "field 'label' must be a JSON list of labels from"),
    (lambda o: o.update(label=["mass", 3]), "field 'label'[1] must be str"),
    (lambda o: o.update(candidates=["mass", "hernia"]), "field 'candidates': ['hernia'] not in the label set"),
    (lambda o: o.update(candidates=["effusion"]), "field 'label': ['mass'] not among the candidates"),
    (lambda o: o.update(metadata={"answer_type": "open"}), "field 'metadata.answer_type': 'open' is not one of"),
])
def test_bad_multilabel_records(tmp_path, mutate, message):
    out = _write_multilabel(tmp_path / "ml")
    _rewrite_line(out / "queries-test.jsonl", 1, mutate)
    with pytest.raises(DatasetError) as err:
        load_dataset(out, verify_checksums=False)
    assert "queries-test.jsonl:1:" in str(err.value) and message in str(err.value)


def test_empty_set_needs_allow_empty(tmp_path):
    with pytest.raises(DatasetError, match=r"queries-test.jsonl:3: field 'label': the empty set is not allowed"):
        _write_multilabel(tmp_path / "ml", allow_empty=False)
    assert list(tmp_path.iterdir()) == []
    _write_multilabel(tmp_path / "ml2", allow_empty=False, sets=(("mass",),))


def _edit_yaml(root, **changes):
    import yaml

    meta = yaml.safe_load((root / "dataset.yaml").read_text())
    meta.update(changes)
    (root / "dataset.yaml").write_text(yaml.safe_dump(meta))


@pytest.mark.parametrize("changes, message", [
    ({"labels": ["effusion", "mass", "mass"]}, "field 'labels': ['mass'] listed more than once"),
    ({"labels": ["effusion", "mass, nodule"]}, "must be non-empty and contain no ','"),
    ({"labels": ["effusion", "Mass", "mass"]}, "'Mass' and 'mass' are the same answer"),
    ({"labels": ["effusion", "None", "mass"]}, "'None' is reserved in a multilabel task"),
    ({"allow_empty": "yes"}, "field 'allow_empty' must be bool"),
    ({"task": "classification"}, "field 'allow_empty' is valid only with task: multilabel"),
    ({"task": "multi-label"}, "field 'task': 'multi-label' is not one of ['classification', 'multilabel', 'vqa']"),
])
def test_bad_multilabel_meta(tmp_path, changes, message):
    out = _write_multilabel(tmp_path / "ml")
    _edit_yaml(out, **changes)
    with pytest.raises(DatasetError) as err:
        load_dataset(out)
    assert "dataset.yaml" in str(err.value) and message in str(err.value)


def test_list_label_outside_multilabel_task(tiny):
    _rewrite_line(tiny / "queries-test.jsonl", 2, lambda o: o.update(label=["yes"]))
    with pytest.raises(DatasetError, match=r"queries-test.jsonl:2: field 'label' must be str, got a list .*"
                                           r"valid only in a dataset with task: multilabel"):
        _load_unchecked(tiny)


def test_label_set_helpers():
    from dxrag.core.base.records import format_label_set, parse_label_set

    assert format_label_set({"nodule", "effusion"}, FINDINGS) == "effusion, nodule"
    assert format_label_set([], FINDINGS) == "none"
    with pytest.raises(ValueError, match="not in the label set"):
        format_label_set(["hernia"], FINDINGS)
    assert parse_label_set(" Nodule,effusion ", FINDINGS) == ("effusion", "nodule")
    assert parse_label_set("None", FINDINGS) == ()
    assert parse_label_set("mass, hernia", FINDINGS) is None
    assert parse_label_set("", FINDINGS) is None
    with pytest.raises(ValueError, match="not the canonical string"):
        Query(id="q", image="i", question="?", candidates=(), label="nodule, effusion",
              label_set=("effusion", "nodule"))


def _write_vqa(out, metadata):
    from PIL import Image

    with DatasetWriter(out) as w:
        rel = w.add_image("i0", Image.new("RGB", (4, 4)))
        w.corpus.append(CorpusItem(id="c0", image=rel, text="t"))
        w.queries["test"].append(Query(id="q0", image=rel, question="where?", candidates=(), label="left lung",
                                       metadata=metadata))
        w.meta = DatasetMeta(name="v", task="vqa", labels=["yes", "no"])
    return out


def test_open_vqa_answer_type_is_validated(tmp_path):
    out = _write_vqa(tmp_path / "v", {"answer_type": "open"})
    assert load_dataset(out).queries["test"][0].answer_type == "open"
    _rewrite_line(out / "queries-test.jsonl", 1, lambda o: o.update(label="  "))
    with pytest.raises(DatasetError, match=r"queries-test.jsonl:1: field 'label': empty; an open question"):
        load_dataset(out, verify_checksums=False)
    _rewrite_line(out / "queries-test.jsonl", 1, lambda o: o.update(label="x", metadata={"answer_type": "Open"}))
    with pytest.raises(DatasetError, match=r"queries-test.jsonl:1: field 'metadata.answer_type': 'Open' is not one "
                                           r"of \['closed', 'open'\]"):
        load_dataset(out, verify_checksums=False)


def test_legend(tmp_path):
    out = _write_small(tmp_path / "ds")
    _edit_yaml(out, legend={"yes": "malignant", "no": "benign or normal"})
    assert load_dataset(out).meta.legend == {"yes": "malignant", "no": "benign or normal"}
    for legend, message in [({"yes": "m"}, r"missing: \['no'\]"), ({"yes": "m", "no": "b", "2": "x"},
                                                                    r"not labels: \['2'\]"),
                            ({"yes": "m", "no": ""}, r"\['no'\] must be a non-empty string")]:
        _edit_yaml(out, legend=legend)
        with pytest.raises(DatasetError, match=f"dataset.yaml: field 'legend'.*{message}"):
            load_dataset(out)


def test_legend_integer_keys_from_hand_written_yaml(tmp_path):
    from PIL import Image

    out = tmp_path / "ds"
    with DatasetWriter(out) as w:
        rel = w.add_image("i0", Image.new("RGB", (4, 4)))
        w.corpus.append(CorpusItem(id="c0", image=rel, text="t"))
        w.queries["test"].append(Query(id="q0", image=rel, question="grade?", candidates=("0", "1"), label="1"))
        w.meta = DatasetMeta(name="g", task="classification", labels=["0", "1"])
    text = (out / "dataset.yaml").read_text() + "legend:\n  0: no disease\n  1: disease\n"
    (out / "dataset.yaml").write_text(text)
    assert load_dataset(out, verify_checksums=False).meta.legend == {"0": "no disease", "1": "disease"}


def test_external_corpus_keeps_label_sets_and_legend(tmp_path):
    from dxrag.core.data.corpus import build_corpus_dataset

    src = _write_multilabel(tmp_path / "ml")
    _edit_yaml(src, legend={x: x.upper() for x in FINDINGS})
    jsonl = tmp_path / "kb.jsonl"
    jsonl.write_text(json.dumps({"id": "k0", "img_path": str(src / "images" / "c0.png"), "text": "a mass"}) + "\n")
    ds = load_dataset(build_corpus_dataset(jsonl, src, tmp_path / "out"))
    assert ds.meta.task == "multilabel" and ds.meta.allow_empty and ds.meta.legend["mass"] == "MASS"
    assert [q.label_set for q in ds.queries["test"]] == [("mass",), ("effusion", "nodule"), ()]


def test_written_dataset_follows_the_umask(tmp_path):
    """The dataset folder is built in a temporary sibling (tempfile makes it 0700) and renamed: it must end up as
    readable as a plain mkdir under the user's umask."""
    import os
    import stat

    from dxrag.core.data.synth import generate

    old = os.umask(0o002)
    try:
        path = generate(tmp_path / "synth", seed=0, n_patients=10, n_corpus=20, n_train=10, n_val=5, n_test=5)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o775
    assert stat.S_IMODE((path / "corpus.jsonl").stat().st_mode) == 0o664
