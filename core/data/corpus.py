"""Builder of a dataset directory from an external image–text corpus (ROCO/PMC-OA/MIMIC style JSONL) and the queries
and label set of another dataset directory; images are referenced by absolute path, never copied.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..base.dataset import SPLITS, DatasetError, DatasetMeta, DatasetWriter, load_dataset
from ..base.jsonl import parse_line
from ..base.records import CorpusItem

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "img_path", "text")  # every other field of a line is kept in the item's `metadata`
# Keys of the queries' dataset.yaml `extra` that describe the queries' own corpus, which the output does not keep.
DROPPED_EXTRA = ("same_image", "same_image_keys")


def _string_field(obj: dict[str, Any], name: str, where: str) -> str:
    if name not in obj or obj[name] is None:
        raise DatasetError(f"{where}: missing required field '{name}'; each line needs "
                           f"{', '.join(repr(f) for f in REQUIRED_FIELDS)}")
    value = obj[name]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field '{name}' must be a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise DatasetError(f"{where}: field '{name}' is empty; drop such lines or fill the field")
    return value


def read_corpus_jsonl(corpus_jsonl: Path, image_root: Path) -> tuple[list[CorpusItem], str]:
    """Stream the JSONL into corpus items (image = absolute path of `img_path` under `image_root` unless already
    absolute; the file must exist) and return them with the file's sha256. Errors name file:line:field."""
    if not corpus_jsonl.is_file():
        raise DatasetError(f"{corpus_jsonl}: file not found; --jsonl expects a JSONL file with one object per line "
                           f"holding {', '.join(repr(f) for f in REQUIRED_FIELDS)}")
    digest = hashlib.sha256()
    items: list[CorpusItem] = []
    first_line: dict[str, int] = {}
    with open(corpus_jsonl, "rb") as f, tqdm(total=corpus_jsonl.stat().st_size, desc=f"read {corpus_jsonl.name}",
                                            unit="B", unit_scale=True, leave=False) as bar:
        for lineno, raw in enumerate(f, 1):
            digest.update(raw)
            bar.update(len(raw))
            where = f"{corpus_jsonl}:{lineno}"
            obj = parse_line(raw, corpus_jsonl, lineno, DatasetError)
            if obj is None:
                continue
            item_id, img_path, text = (_string_field(obj, name, where) for name in REQUIRED_FIELDS)
            if item_id in first_line:
                raise DatasetError(f"{where}: field 'id': duplicate id {item_id!r} (first at line "
                                   f"{first_line[item_id]})")
            first_line[item_id] = lineno
            image = Path(img_path).expanduser()
            image = (image if image.is_absolute() else image_root / image).resolve()
            if not image.is_file():
                raise DatasetError(f"{where}: field 'img_path': image file {str(image)!r} not found (relative paths "
                                   f"are resolved against {image_root}; pass --image-root to change that)")
            metadata = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS}
            items.append(CorpusItem(id=item_id, image=str(image), text=text, metadata=metadata))
    if not items:
        raise DatasetError(f"{corpus_jsonl}: no corpus items (the file holds no non-blank line)")
    return items, digest.hexdigest()


def build_corpus_dataset(corpus_jsonl: Path, queries_from: Path, out: Path, overwrite: bool = False,
                         image_root: Path | None = None) -> Path:
    """Write a dataset directory at `out` (atomically) whose corpus is the JSONL's items and whose queries (every
    split) and label set are those of the dataset directory `queries_from`.

    Each JSONL line is an object with string fields `id`, `img_path` and `text` (other fields go to the item's
    metadata); a relative `img_path` is resolved against `image_root` (default: the JSONL file's directory). Corpus
    and query images are referenced by absolute path, not copied, so `out` stays valid only while they stay in place.
    The queries' own corpus is dropped, and with it its same-image keys: the external corpus shares no images with
    the queries.
    """
    corpus_jsonl = Path(corpus_jsonl).resolve()
    queries_from = Path(queries_from).resolve()
    out = Path(out)
    image_root = Path(image_root).resolve() if image_root is not None else corpus_jsonl.parent
    if out.resolve() == queries_from:
        raise DatasetError(f"--out {out}: is the --queries-from directory, whose images the new dataset references; "
                           f"choose another output directory")
    if not image_root.is_dir():
        raise DatasetError(f"--image-root {image_root}: not a directory")
    source = load_dataset(queries_from)
    items, digest = read_corpus_jsonl(corpus_jsonl, image_root)
    with DatasetWriter(out, overwrite=overwrite) as w:
        w.corpus = items
        for split, rows in source.queries.items():
            w.queries[split] = [dataclasses.replace(q, image=str(source.image_path(q.image).resolve())) for q in rows]
        meta = source.meta
        w.meta = DatasetMeta(
            name=f"{meta.name}-{corpus_jsonl.stem}",
            task=meta.task,
            labels=list(meta.labels),
            allow_empty=meta.allow_empty,
            legend=dict(meta.legend),
            source=f"corpus: {corpus_jsonl}; queries: {meta.source or meta.name} (from {queries_from})",
            license=f"corpus: see the license of {corpus_jsonl.name}'s source; queries: {meta.license or 'unknown'}",
            description=f"Corpus of {len(items)} image-text items from {corpus_jsonl.name}; queries and label set "
                        f"of '{meta.name}'. Images are referenced by absolute path, not copied.",
            extra={
                "builder": "dxrag.core.data.corpus",
                "corpus_jsonl": str(corpus_jsonl),
                "corpus_jsonl_sha256": digest,
                "image_root": str(image_root),
                "images": "absolute paths to the original files (not copied); moving them invalidates this dataset",
                "queries_from": str(queries_from),
                "queries_name": meta.name,
                "queries_extra": {k: v for k, v in meta.extra.items() if k not in DROPPED_EXTRA},
            },
        )
    n_queries = "/".join(str(len(w.queries[s])) for s in SPLITS)
    log.info("wrote %s: %d corpus items from %s; queries train/val/test %s from %s", out, len(items), corpus_jsonl,
             n_queries, queries_from)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dxrag data corpus`."""
    parser.add_argument("--jsonl", type=Path, required=True,
                        help="corpus JSONL: one object per line with string fields id, img_path, text (other fields "
                             "are kept as metadata)")
    parser.add_argument("--queries-from", type=Path, required=True,
                        help="dataset directory whose queries (all splits) and label set to use, e.g. the output of "
                             "`dxrag data medmnist`")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="directory that relative img_path values are resolved against (default: the JSONL "
                             "file's directory)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def run(args: argparse.Namespace) -> int:
    """Run `dxrag data corpus`; DatasetError propagates to the caller with its message."""
    out = build_corpus_dataset(args.jsonl, args.queries_from, args.out, overwrite=args.overwrite,
                               image_root=args.image_root)
    print(f"wrote {out}")
    return 0
