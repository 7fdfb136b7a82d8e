"""Converter of a multi-label table (one row per image: an id column and one 0/1 column per finding, as VinDr-PCXR's
and BRSET's label CSVs) plus an image folder into a "multilabel" dataset directory.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..base.dataset import (SPLITS, DatasetError, DatasetMeta, DatasetWriter, check_multilabel_labels, open_image,
                       sha256_file)
from ..base.records import CorpusItem, Query

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
TRUE, FALSE = ("1", "1.0", "true"), ("0", "0.0", "false")
QUESTION = "Which of these findings are present in this image? Answer with the findings separated by commas"


@dataclass(frozen=True)
class Row:
    """One table row: where it was read, its image, its split (None: assigned by hash) and its positive labels."""

    where: str
    image_id: str
    image: Path
    split: str | None
    group: str | None
    labels: tuple[str, ...]


def default_question(allow_empty: bool) -> str:
    return QUESTION + (", or none." if allow_empty else ".")


def find_image(images: Path, image_id: str, where: str, id_column: str) -> Path:
    """The file of an image id: `images/<id>` when it names a file, else `<id>` plus .png, .jpg or .jpeg."""
    names = [image_id] + [image_id + s for s in IMAGE_SUFFIXES if not image_id.lower().endswith(s)]
    for name in names:
        path = images / name
        if path.is_file() and path.resolve().is_relative_to(images.resolve()):
            return path
    raise DatasetError(f"{where}: field '{id_column}': no image file for {image_id!r} in {images} (tried "
                       f"{', '.join(names)}); images must be PNG or JPEG (convert DICOM files first)")


def read_table(path: Path, images: Path, *, id_column: str, labels: list[str] | None, split_column: str | None,
               group_column: str | None, allow_empty: bool, fixed_split: str | None = None,
               ) -> tuple[list[str], list[Row]]:
    """Parse and validate one label table; returns (label columns, rows). Errors name file:line:column."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found; expected a CSV with an '{id_column}' column and one 0/1 column "
                           f"per label")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        special = [c for c in (id_column, split_column, group_column) if c]
        missing = [c for c in special if c not in header]
        if missing:
            raise DatasetError(f"{path}:1: missing column(s) {missing}; the header has {header}")
        if labels is None:
            label_columns = [h for h in header if h not in special]
        else:
            label_columns = list(labels)
            absent = [c for c in label_columns if c not in header]
            if absent:
                raise DatasetError(f"{path}:1: --labels {absent} not in the header {header}")
        if not label_columns:
            raise DatasetError(f"{path}:1: no label columns; the header has {header}")
        check_multilabel_labels(label_columns, f"{path}:1")
        rows: list[Row] = []
        seen: dict[str, str] = {}
        for record in reader:
            where = f"{path}:{reader.line_num}"
            image_id = (record.get(id_column) or "").strip()
            if not image_id:
                raise DatasetError(f"{where}: field '{id_column}' is empty")
            if image_id in seen:
                raise DatasetError(f"{where}: field '{id_column}': duplicate image {image_id!r} (first at "
                                   f"{seen[image_id]}); the table needs one row per image (merge readers first)")
            seen[image_id] = where
            positive = []
            for column in label_columns:
                value = (record.get(column) or "").strip().lower()
                if value in TRUE:
                    positive.append(column)
                elif value not in FALSE:
                    hint = "" if labels is not None else " (pass --labels to choose the label columns)"
                    raise DatasetError(f"{where}: field '{column}': {record.get(column)!r} is not 0 or 1{hint}")
            if not positive and not allow_empty:
                raise DatasetError(f"{where}: no label column is 1; pass --allow-empty if an image may have no "
                                   f"finding (or keep a 'No finding' column among the labels)")
            split = fixed_split
            if split_column:
                value = (record.get(split_column) or "").strip().lower()
                if value not in SPLIT_NAMES:
                    raise DatasetError(f"{where}: field '{split_column}': {record.get(split_column)!r} is not one "
                                       f"of {sorted(SPLIT_NAMES)}")
                split = SPLIT_NAMES[value]
            group = ((record.get(group_column) or "").strip() or None) if group_column else None
            rows.append(Row(where, image_id, find_image(images, image_id, where, id_column), split, group,
                            tuple(positive)))
    if not rows:
        raise DatasetError(f"{path}: no data rows")
    return label_columns, rows


def hash_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """A deterministic split from sha256 of the image (or group) key."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / float(1 << 48)
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def report_text(modality: str, labels: tuple[str, ...]) -> str:
    return f"{modality[0].upper() + modality[1:]} report. Findings: {', '.join(labels) if labels else 'no finding'}."


def convert_labels_csv(csv_path: Path, images: Path, out: Path, *, test_csv: Path | None = None,
                       id_column: str = "image_id", labels: list[str] | None = None,
                       split_column: str | None = None, group_column: str | None = None,
                       question: str | None = None, allow_empty: bool = False, modality: str = "image",
                       val_fraction: float = 0.1, test_fraction: float = 0.2, max_corpus: int | None = None,
                       seed: int = 0, name: str | None = None, source: str = "", license: str = "",
                       overwrite: bool = False) -> Path:
    """Convert a label table into a "multilabel" dataset directory at `out` (written atomically).

    Labels = the label columns in table order (all columns but the id/split/group columns, or `labels`). A query's
    label = the set of columns that are 1. Splits: the `split_column`; else `test_csv` is the test split and val is
    a hashed `val_fraction` of the rest; else hashed fractions of the table. Hashing uses the `group_column` (e.g.
    patient id) when given, so one patient's images stay in one split. Corpus: the train rows (a seeded subset of
    `max_corpus`) with a templated report listing their findings. Images are copied byte for byte.
    """
    csv_path, images = Path(csv_path), Path(images)
    if not images.is_dir():
        raise DatasetError(f"--images {images}: not a directory")
    for value, flag in ((val_fraction, "--val-fraction"), (test_fraction, "--test-fraction")):
        if not 0 <= value < 1:
            raise DatasetError(f"{flag} {value}: must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise DatasetError(f"--val-fraction + --test-fraction = {val_fraction + test_fraction}: must be below 1")
    if max_corpus is not None and max_corpus < 1:
        raise DatasetError(f"--max-corpus {max_corpus}: must be at least 1")
    opts = dict(id_column=id_column, labels=labels, split_column=split_column, group_column=group_column,
                allow_empty=allow_empty)
    label_columns, rows = read_table(csv_path, images, **opts)
    sources = {csv_path.name: sha256_file(csv_path)}
    if test_csv is not None:
        test_csv = Path(test_csv)
        _, test_rows = read_table(test_csv, images, **{**opts, "labels": label_columns},
                                             fixed_split=None if split_column else "test")
        ids = {r.image_id: r.where for r in rows}
        dup = next((r for r in test_rows if r.image_id in ids), None)
        if dup:
            raise DatasetError(f"{dup.where}: field '{id_column}': image {dup.image_id!r} is also in "
                               f"{ids[dup.image_id]}")
        rows += test_rows
        sources[test_csv.name] = sha256_file(test_csv)
    split_of = {}
    for r in rows:
        if r.split is not None:
            split_of[r.image_id] = r.split
        else:
            key = r.group or r.image_id
            split_of[r.image_id] = hash_split(key, val_fraction, 0.0 if test_csv else test_fraction)
    train = [r for r in rows if split_of[r.image_id] == "train"]
    if not train:
        raise DatasetError(f"{csv_path}: no row falls in the train split, which the corpus is built from")
    rng = np.random.default_rng(seed)
    in_corpus = {r.image_id for r in train}
    if max_corpus is not None and max_corpus < len(train):
        keep = rng.choice(len(train), size=max_corpus, replace=False).tolist()
        in_corpus = {train[i].image_id for i in keep}
    question = question or default_question(allow_empty)

    with DatasetWriter(out, overwrite=overwrite) as w:
        for n, r in enumerate(tqdm(rows, desc="label-table images", unit="img", leave=False)):
            try:
                open_image(r.image)
            except DatasetError as e:
                raise DatasetError(f"{r.where}: field '{id_column}': {e}") from None
            rel = w.copy_image(r.image, f"img-{n:06d}")
            meta = {"source_image": r.image_id, "source_file": r.where.rsplit(":", 1)[0]}
            if r.group is not None:
                meta["group"] = r.group
            w.queries[split_of[r.image_id]].append(Query(
                id=f"q-{r.image_id}", image=rel, question=question, candidates=tuple(label_columns), label="",
                label_set=r.labels, metadata=meta))
            if r.image_id in in_corpus:
                w.corpus.append(CorpusItem(id=f"c-{r.image_id}", image=rel, text=report_text(modality, r.labels),
                                           label=w.queries[split_of[r.image_id]][-1].label, metadata=dict(meta)))
        w.meta = DatasetMeta(
            name=name or csv_path.stem,
            task="multilabel",
            labels=label_columns,
            allow_empty=allow_empty,
            source=source or f"label table {csv_path.name} with images from {images}",
            license=license,
            description="Multi-label dataset converted by dxrag from a label table (one 0/1 column per finding): a "
                        "query's label is the set of findings marked 1; corpus = train images with a templated "
                        "report listing their findings.",
            extra={
                "converter": "dxrag.core.data.labels_csv",
                "csv": str(csv_path),
                "test_csv": str(test_csv) if test_csv else None,
                "images": str(images),
                "source_sha256": sources,
                "id_column": id_column,
                "split": f"column {split_column}" if split_column else
                         (f"test = {test_csv.name}; val = hashed {val_fraction} of the rest" if test_csv else
                          f"hashed by {group_column or id_column}: val {val_fraction}, test {test_fraction}"),
                "group_column": group_column,
                "max_corpus": max_corpus,
                "seed": seed,
                "question": question,
                "same_image": "A train query and the corpus item of the same image share metadata.source_image and "
                              "the 'image' file; exclude such items from the query's retrieved list.",
                "same_image_keys": ["source_image"],
            },
        )
    log.info("wrote %s (%d labels, %d corpus items; queries %s) to %s", w.meta.name, len(label_columns),
             len(in_corpus), "/".join(str(len(w.queries[s])) for s in SPLITS), out)
    return Path(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dxrag data labels-csv`."""
    parser.add_argument("--csv", type=Path, required=True,
                        help="label table: an id column and one 0/1 column per label (e.g. VinDr-PCXR "
                             "image_labels_train.csv, BRSET labels.csv with --labels)")
    parser.add_argument("--images", type=Path, required=True, help="folder of the images (<id>, <id>.png/.jpg)")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--test-csv", type=Path, default=None, help="a second table that is the test split")
    parser.add_argument("--id-column", default="image_id", help="column naming the image (default image_id)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated label columns (default: every column but the id/split/group ones)")
    parser.add_argument("--split-column", default=None, help="column with train/val/test per row")
    parser.add_argument("--group-column", default=None,
                        help="column (e.g. patient_id) whose rows stay in one hashed split")
    parser.add_argument("--question", default=None, help=f"query question (default: {QUESTION!r} ...)")
    parser.add_argument("--allow-empty", action="store_true",
                        help="an image may have no label at 1 (its answer is 'none')")
    parser.add_argument("--modality", default="image", help="what the images are, for report texts (e.g. "
                                                             "'pediatric chest X-ray')")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="unused with --test-csv/--split-column")
    parser.add_argument("--max-corpus", type=int, default=None, help="seeded subset of train images in the corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="dataset name (default: the CSV's stem)")
    parser.add_argument("--source", default="", help="provenance/citation for dataset.yaml")
    parser.add_argument("--license", default="", help="license for dataset.yaml")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def run(args: argparse.Namespace) -> int:
    """Run `dxrag data labels-csv`; DatasetError propagates to the caller with its message."""
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    out = convert_labels_csv(
        args.csv, args.images, args.out, test_csv=args.test_csv, id_column=args.id_column, labels=labels,
        split_column=args.split_column, group_column=args.group_column, question=args.question,
        allow_empty=args.allow_empty, modality=args.modality, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, max_corpus=args.max_corpus, seed=args.seed, name=args.name,
        source=args.source, license=args.license, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
