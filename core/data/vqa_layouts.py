"""Converters of the public medical VQA sets in their distributed layouts: Hugging Face parquet / save_to_disk folders
(VQA-RAD, SLAKE, PathVQA: image bytes + question + answer) and SLAKE's own json layout (English questions only).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from ..base.answers import CLOSED, OPEN
from ..base.dataset import DatasetError, DatasetMeta, DatasetWriter, open_image, sha256_file
from ..base.records import CorpusItem, Query
from .vqarad import YES_NO, corpus_text, json_entries, split_val_images

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "validate": "val", "dev": "val",
               "test": "test"}
SLAKE_FILES = {"train": ("train.json",), "val": ("validate.json", "validation.json"), "test": ("test.json",)}
# Citations for the names `dxrag data vqa-hf --name` knows; any other name converts the same way without one.
SOURCES = {
    "vqa-rad": ("VQA-RAD (Lau et al., Scientific Data 5, 180251 (2018); https://osf.io/89kps), Hugging Face layout "
                "(e.g. flaviagiammarino/vqa-rad)", "CC0 1.0", "Radiology image"),
    "slake": ("SLAKE (Liu et al., 'SLAKE: A Semantically-Labeled Knowledge-Enhanced Dataset for Medical Visual "
              "Question Answering', ISBI 2021; https://www.med-vqa.com/slake), Hugging Face layout", "",
              "Radiology image"),
    "path-vqa": ("PathVQA (He et al., 'PathVQA: 30000+ Questions for Medical Visual Question Answering', "
                 "arXiv:2003.10286), Hugging Face layout (e.g. flaviagiammarino/path-vqa)", "", "Pathology image"),
}
_SUFFIX = {"PNG": ".png", "JPEG": ".jpg"}


@dataclass(frozen=True)
class VQARow:
    """One question of a source file. `image_key` identifies the image (file name, or sha256 of its bytes);
    `source_answer_type` is "closed", "open" or None when the layout does not say."""

    qid: str
    image_key: str
    question: str
    answer: str
    source_answer_type: str | None
    where: str
    organ: str | None = None  # read by vqarad.corpus_text
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def yes_no(self) -> bool:
        return self.source_answer_type in ("closed", None) and self.answer in YES_NO


def _answer(value: Any, where: str, column: str) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DatasetError(f"{where}: field '{column}' must be a string answer, got {type(value).__name__} "
                           f"{value!r:.60}")
    text = str(value).strip().lower()
    if not text:
        raise DatasetError(f"{where}: field '{column}' is empty")
    return text


def _question(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: field '{column}' must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _answer_type(value: Any, where: str, column: str) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text not in ("closed", "open"):
        raise DatasetError(f"{where}: field '{column}': {value!r} is not CLOSED or OPEN")
    return text


# ---------------------------------------------------------------------------------------------------- the writer


def write_vqa(w: DatasetWriter, rows: dict[str, list[VQARow]], image_of: dict[str, str], *, name: str, source: str,
              license: str, heading, extra: dict) -> None:
    """Fill an open DatasetWriter from the rows of each split (images already added: key -> relative path).

    Closed yes/no questions -> answer_type "closed", candidates ["yes", "no"]; every other question -> "open" with
    its free-text answer. Without a val split, val = the train questions on a deterministic ~10% of the train images
    that the test split does not use. Corpus: one item per train image that no val or test question uses, text from
    its QA pairs (vqarad.corpus_text); queries and corpus items of one image share metadata.source_image.
    """
    train, test = rows.get("train", []), rows.get("test", [])
    if not train:
        raise DatasetError(f"{extra.get('root')}: no train questions; the corpus is built from the train images")
    test_images = {r.image_key for r in test}
    val = rows.get("val", [])
    carved: set[str] = set()
    if not val:
        train_only = sorted({r.image_key for r in train} - test_images)
        if len(train_only) < 2:
            raise DatasetError(f"{extra.get('root')}: {len(train_only)} train image(s) outside the test split; the "
                               f"corpus and the val split need at least 2")
        carved = split_val_images(train_only)
        val = [r for r in train if r.image_key in carved]
        train = [r for r in train if r.image_key not in carved]
    eval_images = test_images | {r.image_key for r in val}
    by_image: dict[str, list[VQARow]] = defaultdict(list)
    for r in train:
        by_image[r.image_key].append(r)
    corpus_keys = sorted(k for k in by_image if k not in eval_images)
    if not corpus_keys:
        raise DatasetError(f"{extra.get('root')}: every train image is also used by a val or test question; no "
                           f"image is left for the corpus")
    for n, key in enumerate(corpus_keys):
        qas = by_image[key]
        w.corpus.append(CorpusItem(id=f"c{n:06d}", image=image_of[key], text=corpus_text(qas, heading(qas)),
                                   metadata={"source_image": key, "n_qa": len(qas)}))
    for split, split_rows in (("train", train), ("val", val), ("test", test)):
        for r in split_rows:
            w.queries[split].append(Query(
                id=f"q{r.qid}" if r.qid.isdigit() else f"q-{r.qid}", image=image_of[r.image_key], question=r.question,
                candidates=YES_NO if r.yes_no else (), label=r.answer,
                metadata={"answer_type": CLOSED if r.yes_no else OPEN,
                          "source_answer_type": r.source_answer_type, "qid": r.qid, "source_image": r.image_key,
                          "image_in_test": r.image_key in test_images, **r.metadata}))
    counts = {s: sum(q.metadata["answer_type"] == CLOSED for q in w.queries[s]) for s in w.queries}
    w.meta = DatasetMeta(
        name=name, task="vqa", labels=list(YES_NO), source=source, license=license,
        description=f"{name} medical VQA converted by dxrag: closed yes/no questions are a two-class task, other "
                    f"questions are kept as open questions with free-text answers; corpus = train images not used "
                    f"by the val or test questions, text from their QA pairs.",
        extra={**extra,
               "answer_normalisation": "strip + lower-case",
               "val_images": sorted(carved) if carved else "the source's own validation split",
               "closed_questions": counts,
               "same_image": "Queries and corpus items of the same source image share metadata.source_image and "
                             "the 'image' file; val and test images are not in the corpus; exclude same-image "
                             "items from a train query's retrieved list.",
               "same_image_keys": ["source_image"]})
    log.info("wrote %s (%d corpus items; queries train/val/test %d/%d/%d)", name, len(corpus_keys),
             len(w.queries["train"]), len(w.queries["val"]), len(w.queries["test"]))


# ------------------------------------------------------------------------------------------ Hugging Face layouts


def hf_files(root: Path) -> dict[str, list[Path]]:
    """Split -> data files of a Hugging Face dataset folder: hub parquet files (`data/train-00000-of-00001.parquet`,
    `test.parquet`) or a `save_to_disk` folder (`train/data-00000-of-00001.arrow`)."""
    files: dict[str, list[Path]] = defaultdict(list)
    unknown = []
    for path in sorted([*root.rglob("*.parquet"), *root.rglob("*.arrow")]):
        if path.name.startswith("cache-"):
            continue
        rel = path.relative_to(root)
        stem = path.name.split("-")[0].split(".")[0].lower()
        names = [stem, *(p.lower() for p in reversed(rel.parts[:-1]))]  # the file's, then its folders' inwards out
        split = next((SPLIT_NAMES[c] for c in names if c in SPLIT_NAMES), None)
        (files[split].append(path) if split else unknown.append(str(rel)))
    if unknown:
        raise DatasetError(f"{root}: cannot tell the split of {unknown[:5]}; name files or folders by split "
                           f"({', '.join(sorted(SPLIT_NAMES))})")
    if not files:
        raise DatasetError(f"{root}: no .parquet or .arrow files; expected a Hugging Face dataset folder (hub "
                           f"parquet files such as data/train-00000-of-00001.parquet, or a save_to_disk folder)")
    return dict(files)


def _batches(path: Path) -> Iterator[tuple[Any, Any]]:
    """(schema, record batches) of a parquet file or an Arrow IPC file/stream (what save_to_disk writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            f = pq.ParquetFile(path)
            return f.schema_arrow, f.iter_batches(batch_size=256)
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
        return reader.schema, iter(reader)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable {path.suffix[1:]} file ({e})") from None


def _image_bytes(cell: Any, path: Path, root: Path, where: str, column: str) -> bytes:
    """The encoded image of a cell: a datasets Image struct {bytes, path}, raw bytes, or a path to a file."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        cell = cell.get("path")
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str) and cell:
        for base in (path.parent, root):
            if (base / cell).is_file():
                return (base / cell).read_bytes()
    raise DatasetError(f"{where}: field '{column}': no image bytes (expected a datasets Image {{bytes, path}} "
                       f"struct, binary data or the path of an image file), got {str(cell)[:60]!r}")


def _store_image(w: DatasetWriter, data: bytes, digest: str, where: str, column: str) -> str:
    """Decode once, store the bytes unchanged (PNG/JPEG; other formats re-encoded as PNG); the relative path."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
            if fmt not in _SUFFIX:
                return w.add_image(digest[:16], im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"{where}: field '{column}': image does not decode ({e})") from None
    return w.add_image_bytes(digest[:16], data, _SUFFIX[fmt])


def convert_hf(root: Path, out: Path, name: str | None = None, image_column: str = "image",
               question_column: str = "question", answer_column: str = "answer",
               answer_type_column: str = "answer_type", lang_column: str = "q_lang", language: str = "en",
               source: str | None = None, license: str | None = None, overwrite: bool = False) -> Path:
    """Convert a Hugging Face VQA folder (splits train, validation/val, test) into a "vqa" dataset directory.

    Required columns: image, question, answer (names configurable). Used when present: `answer_type` (CLOSED/OPEN;
    without it a yes/no answer makes a closed question) and `q_lang` (only `language` rows are kept). Images are
    identified by the sha256 of their bytes, which is the same-image key.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"--root {root}: not a directory")
    name = name or root.name.lower()
    preset = SOURCES.get(name, ("", "", "Medical image"))
    files = hf_files(root)
    rows: dict[str, list[VQARow]] = defaultdict(list)
    dropped = 0
    with DatasetWriter(out, overwrite=overwrite) as w:
        image_of: dict[str, str] = {}
        for split in ("train", "val", "test"):
            n = 0
            for path in files.get(split, []):
                schema, batches = _batches(path)
                missing = [c for c in (image_column, question_column, answer_column) if c not in schema.names]
                if missing:
                    raise DatasetError(f"{path}: missing column(s) {missing} (has {schema.names}); pass "
                                       f"--image-column/--question-column/--answer-column to name them")
                has_type, has_lang = answer_type_column in schema.names, lang_column in schema.names
                i = 0
                for batch in tqdm(batches, desc=f"{name} {split}", unit="batch", leave=False):
                    for record in batch.to_pylist():
                        where = f"{path}: row {i}"
                        i += 1
                        if has_lang and str(record.get(lang_column) or "").strip().lower() != language:
                            dropped += 1
                            continue
                        data = _image_bytes(record[image_column], path, root, where, image_column)
                        digest = hashlib.sha256(data).hexdigest()
                        if digest not in image_of:
                            image_of[digest] = _store_image(w, data, digest, where, image_column)
                        rows[split].append(VQARow(
                            qid=f"{split}-{n:06d}", image_key=digest,
                            question=_question(record[question_column], where, question_column),
                            answer=_answer(record[answer_column], where, answer_column),
                            source_answer_type=_answer_type(record[answer_type_column], where, answer_type_column)
                            if has_type else None, where=where,
                            metadata={"source_file": str(path.relative_to(root)), "source_row": i - 1}))
                        n += 1
        heading = preset[2]
        write_vqa(w, rows, image_of, name=name, source=source or preset[0] or f"Hugging Face dataset folder {root}",
                  license=license if license is not None else preset[1], heading=lambda qas: heading,
                  extra={"converter": "dxrag.core.data.vqa_layouts (hf)", "root": str(root),
                         "source_sha256": {str(p.relative_to(root)): sha256_file(p)
                                           for ps in files.values() for p in ps},
                         "columns": {"image": image_column, "question": question_column, "answer": answer_column},
                         "other_language_rows_dropped": dropped})
    return Path(out)


# --------------------------------------------------------------------------------------------- SLAKE json layout


def read_slake_file(path: Path, language: str = "en") -> tuple[list[VQARow], int]:
    """One SLAKE json file (a list of {qid, img_name, question, answer, answer_type, q_lang, location, modality,
    content_type, ...}); rows in other languages are dropped (returned count)."""
    rows, dropped = [], 0
    for where, entry in json_entries(path):
        for key in ("qid", "img_name", "question", "answer", "answer_type", "q_lang"):
            if entry.get(key) is None:
                raise DatasetError(f"{where}: missing field '{key}'")
        if str(entry["q_lang"]).strip().lower() != language:
            dropped += 1
            continue
        img = entry["img_name"]
        if not isinstance(img, str) or not img or Path(img).is_absolute() or ".." in Path(img).parts:
            raise DatasetError(f"{where}: field 'img_name': {img!r} is not a relative path under imgs/")
        meta = {k: entry[k] for k in ("img_id", "location", "modality", "content_type", "base_type") if k in entry}
        rows.append(VQARow(qid=str(entry["qid"]), image_key=img, question=_question(entry["question"], where,
                                                                                  "question"),
                           answer=_answer(entry["answer"], where, "answer"),
                           source_answer_type=_answer_type(entry["answer_type"], where, "answer_type"), where=where,
                           organ=entry.get("location"), metadata=meta))
    return rows, dropped


def _slake_heading(qas: list[VQARow]) -> str:
    first = qas[0].metadata
    parts = [str(first[k]) for k in ("location", "modality") if first.get(k)]
    return f"{' '.join(parts) or 'Radiology'} image"


def convert_slake(root: Path, out: Path, language: str = "en", overwrite: bool = False,
                  license: str = "") -> Path:
    """Convert SLAKE (train.json, validate.json or validation.json, test.json, imgs/<folder>/source.jpg) into a
    "vqa" dataset directory, English questions only (`q_lang == language`)."""
    root = Path(root)
    rows: dict[str, list[VQARow]] = {}
    sources, dropped = {}, 0
    for split, names in SLAKE_FILES.items():
        path = next((root / n for n in names if (root / n).is_file()), None)
        if path is None:
            if split == "val":
                continue
            raise DatasetError(f"{root / names[0]}: file not found; a SLAKE folder holds train.json, "
                               f"validate.json, test.json and imgs/")
        rows[split], d = read_slake_file(path, language)
        dropped += d
        sources[path.name] = sha256_file(path)
    seen: dict[str, str] = {}
    for r in (r for split_rows in rows.values() for r in split_rows):
        if r.qid in seen:
            raise DatasetError(f"{r.where}: field 'qid': duplicate qid (first at {seen[r.qid]})")
        seen[r.qid] = r.where
    first_use = {}
    for r in (r for split_rows in rows.values() for r in split_rows):
        first_use.setdefault(r.image_key, r.where)
    with DatasetWriter(out, overwrite=overwrite) as w:
        image_of = {}
        for key, where in tqdm(sorted(first_use.items()), desc="SLAKE images", unit="img", leave=False):
            image = root / "imgs" / key
            try:
                open_image(image)
            except DatasetError as e:
                raise DatasetError(f"{where}: field 'img_name': {e}") from None
            image_of[key] = w.copy_image(image, "-".join(Path(key).with_suffix("").parts))
        write_vqa(w, rows, image_of, name="slake", source=SOURCES["slake"][0].replace("Hugging Face layout",
                                                                                        "json layout"),
                  license=license, heading=_slake_heading,
                  extra={"converter": "dxrag.core.data.vqa_layouts (slake)", "root": str(root),
                         "source_sha256": sources, "language": language, "other_language_rows_dropped": dropped})
    return Path(out)


# ------------------------------------------------------------------------------------------------------------ CLI


def add_hf_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dxrag data vqa-hf`."""
    parser.add_argument("--root", type=Path, required=True,
                        help="Hugging Face dataset folder (hub parquet files or a save_to_disk folder)")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--name", default=None,
                        help=f"dataset name (default: the folder's name); {', '.join(SOURCES)} add their citation")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--question-column", default="question")
    parser.add_argument("--answer-column", default="answer")
    parser.add_argument("--language", default="en", help="keep rows whose q_lang is this, when the column exists")
    parser.add_argument("--license", default=None, help="license for dataset.yaml (vqa-rad: CC0 1.0 by default)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def run_hf(args: argparse.Namespace) -> int:
    out = convert_hf(args.root, args.out, name=args.name, image_column=args.image_column,
                     question_column=args.question_column, answer_column=args.answer_column,
                     language=args.language, license=args.license, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def add_slake_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dxrag data slake`."""
    parser.add_argument("--root", type=Path, required=True,
                        help="SLAKE folder with train.json, validate.json, test.json and imgs/")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--language", default="en", help="q_lang to keep (default en)")
    parser.add_argument("--license", default="", help="license for dataset.yaml")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def run_slake(args: argparse.Namespace) -> int:
    out = convert_slake(args.root, args.out, language=args.language, license=args.license,
                        overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
