"""Converter of VQA-RAD in the MEVF json layout (trainset.json, testset.json, images/) into a dataset directory.

Corpus = train images that no evaluation question uses, one item per image; closed yes/no questions form the label set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from ..base.answers import CLOSED, OPEN
from ..base.dataset import DatasetError, DatasetMeta, DatasetWriter, open_image, sha256_file
from ..base.records import CorpusItem, Query

log = logging.getLogger(__name__)

YES_NO = ("yes", "no")
VAL_FRACTION = 0.1  # of the train images that the test split does not use
TRAIN_FILE, TEST_FILE, ANSWERS_FILE = "trainset.json", "testset.json", "answer_all_list.json"
SOURCE = ("VQA-RAD (Lau et al., 'A dataset of clinically generated visual questions and answers about radiology "
          "images', Scientific Data 5, 180251 (2018); https://osf.io/89kps; images from MedPix), in the json layout "
          "and train/test split of MEVF (aioz-ai/MICCAI19-MedVQA, data_RAD)")
LICENSE = "CC0 1.0"
_ORGANS = {"HEAD": "Head", "CHEST": "Chest", "ABD": "Abdominal"}


@dataclass(frozen=True)
class QA:
    """One question-answer pair of a MEVF json file, answer normalised (strip + lower-case)."""

    qid: str
    image_name: str
    question: str
    answer: str
    source_answer_type: str  # "closed" or "open", as the file states it
    organ: str | None
    question_type: str | None
    phrase_type: str | None

    @property
    def yes_no(self) -> bool:
        return self.source_answer_type == "closed" and self.answer in YES_NO


def _field(entry: dict, name: str, kinds: tuple[type, ...], where: str, required: bool = True):
    if entry.get(name) is None:
        if required:
            raise DatasetError(f"{where}: missing field '{name}'")
        return None
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise DatasetError(f"{where}: field '{name}' must be {' or '.join(k.__name__ for k in kinds)}, got "
                           f"{type(value).__name__} {value!r:.60}")
    return value


def json_entries(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) for each entry of a JSON file holding a list of question objects (the MEVF and SLAKE layouts);
    `where` names the file, the entry index and its qid for error messages."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a JSON list of question objects, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        yield where + (f" (qid {entry['qid']})" if "qid" in entry else ""), entry


def read_qa_file(path: Path) -> list[QA]:
    """Parse one MEVF json file (a list of objects with qid, image_name, question, answer, answer_type)."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found; a MEVF VQA-RAD folder holds {TRAIN_FILE}, {TEST_FILE} and "
                           f"images/")
    rows = []
    for where, entry in json_entries(path):
        qid = _field(entry, "qid", (int, str), where)
        answer = str(_field(entry, "answer", (str, int), where)).strip().lower()
        if not answer:
            raise DatasetError(f"{where}: field 'answer' is empty")
        answer_type = _field(entry, "answer_type", (str,), where).strip().lower()
        if answer_type not in ("closed", "open"):
            raise DatasetError(f"{where}: field 'answer_type': {entry['answer_type']!r} is not CLOSED or OPEN")
        question = _field(entry, "question", (str,), where).strip()
        if not question:
            raise DatasetError(f"{where}: field 'question' is empty")
        rows.append(QA(
            qid=str(qid), image_name=_field(entry, "image_name", (str,), where), question=question,
            answer=answer, source_answer_type=answer_type,
            organ=_field(entry, "image_organ", (str,), where, required=False),
            question_type=_field(entry, "question_type", (str,), where, required=False),
            phrase_type=_field(entry, "phrase_type", (str,), where, required=False)))
    return rows


def _check_references(root: Path, files: dict[Path, list[QA]]) -> None:
    """Unique qids across files; every image_name names a file under images/ that decodes (each decoded once)."""
    seen: dict[str, str] = {}
    first_use: dict[str, str] = {}
    for path, rows in files.items():
        for i, qa in enumerate(rows):
            where = f"{path}: entry {i} (qid {qa.qid})"
            if qa.qid in seen:
                raise DatasetError(f"{where}: field 'qid': duplicate qid (first at {seen[qa.qid]})")
            seen[qa.qid] = where
            first_use.setdefault(qa.image_name, where)
    for name, where in tqdm(sorted(first_use.items()), desc="VQA-RAD images", unit="img", leave=False):
        image = root / "images" / name
        if Path(name).name != name or not image.is_file():
            raise DatasetError(f"{where}: field 'image_name': {name!r} is not a file in {root / 'images'}")
        try:
            open_image(image)
        except DatasetError as e:
            raise DatasetError(f"{where}: field 'image_name': {e}") from None


def _answer_vocabulary(path: Path) -> list[str]:
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(answers, list) or not all(isinstance(a, (str, int)) for a in answers):
        raise DatasetError(f"{path}: expected a JSON list of answer strings")
    return sorted({str(a).strip().lower() for a in answers})


def split_val_images(train_only: list[str]) -> set[str]:
    """A deterministic ~VAL_FRACTION of the train-only images (ordered by sha256 of the name; at least one)."""
    ranked = sorted(train_only, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    return set(ranked[: max(1, round(VAL_FRACTION * len(ranked)))])


def corpus_text(qas: list[QA], heading: str | None = None) -> str:
    """A report-like text from an image's QA pairs: a heading (default: the organ, "Head radiology image."), then
    each distinct question with its answer."""
    if heading is None:
        organ = next((qa.organ for qa in qas if qa.organ), None)
        heading = f"{_ORGANS.get(organ, organ or 'Radiology')} radiology image"
    parts = [f"{heading}."]
    seen = set()
    for qa in sorted(qas, key=lambda qa: (qa.source_answer_type != "open", _qid_order(qa.qid))):
        key = (qa.question.lower(), qa.answer)
        if key in seen:
            continue
        seen.add(key)
        question = qa.question if qa.question.endswith("?") else qa.question + "?"
        parts.append(f"{question} {qa.answer}.")
    return " ".join(parts)


def _qid_order(qid: str) -> tuple[int, str]:
    return (int(qid), "") if qid.isdigit() else (1 << 62, qid)


def _query(qa: QA, image: str, image_in_test: bool) -> Query:
    return Query(
        id=f"q{qa.qid}", image=image, question=qa.question,
        candidates=YES_NO if qa.yes_no else (), label=qa.answer,
        metadata={"answer_type": CLOSED if qa.yes_no else OPEN, "source_answer_type": qa.source_answer_type,
                  "qid": qa.qid, "source_image": qa.image_name, "image_in_test": image_in_test,
                  "image_organ": qa.organ, "question_type": qa.question_type, "phrase_type": qa.phrase_type})


def convert_vqarad(root: Path, out: Path, overwrite: bool = False) -> Path:
    """Convert a MEVF VQA-RAD folder into a "vqa" dataset directory at `out` (written atomically).

    Queries: test QAs -> test; train QAs -> train, except those on a deterministic ~10% of the train-only images ->
    val. Closed yes/no questions get answer_type "closed" and candidates ["yes", "no"]; every other question gets
    answer_type "open" with its answer as label and no candidates. Corpus: one item per train image that neither the
    test nor the val queries use, with a text built from its QA pairs. Images are copied byte for byte.
    """
    root = Path(root)
    train_path, test_path = root / TRAIN_FILE, root / TEST_FILE
    train, test = read_qa_file(train_path), read_qa_file(test_path)
    _check_references(root, {train_path: train, test_path: test})
    test_images = {qa.image_name for qa in test}
    train_only = sorted({qa.image_name for qa in train} - test_images)
    if len(train_only) < 2:
        raise DatasetError(f"{train_path}: {len(train_only)} train image(s) outside the test split; the corpus and "
                           f"the val split need at least 2")
    val_images = split_val_images(train_only)
    corpus_images = [name for name in train_only if name not in val_images]
    by_image: dict[str, list[QA]] = defaultdict(list)
    for qa in train:
        by_image[qa.image_name].append(qa)
    answers_path = root / ANSWERS_FILE
    extra_sources = {TRAIN_FILE: sha256_file(train_path), TEST_FILE: sha256_file(test_path)}
    vocabulary = None
    if answers_path.is_file():
        vocabulary = _answer_vocabulary(answers_path)
        extra_sources[ANSWERS_FILE] = sha256_file(answers_path)

    with DatasetWriter(out, overwrite=overwrite) as w:
        image_of = {name: w.copy_image(root / "images" / name, Path(name).stem)
                    for name in sorted({qa.image_name for qa in train + test})}
        for name in corpus_images:
            w.corpus.append(CorpusItem(
                id=f"c-{Path(name).stem}", image=image_of[name], text=corpus_text(by_image[name]),
                metadata={"source_image": name, "image_organ": by_image[name][0].organ,
                          "n_qa": len(by_image[name])}))
        for qa in train:
            split = "val" if qa.image_name in val_images else "train"
            w.queries[split].append(_query(qa, image_of[qa.image_name], qa.image_name in test_images))
        for qa in test:
            w.queries["test"].append(_query(qa, image_of[qa.image_name], True))
        w.meta = DatasetMeta(
            name="vqa-rad",
            task="vqa",
            labels=list(YES_NO),
            source=SOURCE,
            license=LICENSE,
            description="VQA-RAD radiology VQA (MEVF split) converted by dxrag: closed yes/no questions are a "
                        "two-class task, other questions are kept as open questions with their answers; corpus = "
                        "train images not used by the test or val queries, text from their QA pairs.",
            extra={
                "converter": "dxrag.core.data.vqarad",
                "root": str(root),
                "source_sha256": extra_sources,
                "val_fraction_of_train_only_images": VAL_FRACTION,
                "val_images": sorted(val_images),
                "excluded_from_corpus": "every image used by a test or val query",
                "answer_normalisation": "strip + lower-case",
                "same_image": "Queries and corpus items of the same source image share metadata.source_image and "
                              "the 'image' file. Test and val images are not in the corpus. Train queries are on "
                              "corpus images (exclude same-image items from their retrieved list) or, when "
                              "metadata.image_in_test is true, on test images (the MEVF split is by question, not "
                              "by image).",
                "same_image_keys": ["source_image"],
                "answer_vocabulary": vocabulary,
            },
        )
    log.info("wrote VQA-RAD (%d corpus items; queries train/val/test %d/%d/%d) to %s", len(corpus_images),
             len(w.queries["train"]), len(w.queries["val"]), len(w.queries["test"]), out)
    return Path(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dxrag data vqa-rad`."""
    parser.add_argument("--root", type=Path, required=True,
                        help=f"MEVF VQA-RAD folder with {TRAIN_FILE}, {TEST_FILE}, images/ (and {ANSWERS_FILE})")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def run(args: argparse.Namespace) -> int:
    """Run `dxrag data vqa-rad`; DatasetError propagates to the caller with its message."""
    out = convert_vqarad(args.root, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
