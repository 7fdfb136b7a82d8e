"""The on-disk dataset format (a directory) and its validating loader and atomic writer.

Layout: dataset.yaml, corpus.jsonl, queries-{train,val,test}.jsonl, images/*.png. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from .fsutil import replace_dir
from .records import CorpusItem, Query

SPLITS = ("train", "val", "test")
TASKS = ("classification", "vqa")
CORPUS_FILE = "corpus.jsonl"
META_FILE = "dataset.yaml"


def query_file(split: str) -> str:
    return f"queries-{split}.jsonl"


class DatasetError(ValueError):
    """Invalid dataset directory or record; the message names the file, line and field and what would be valid."""


@dataclass
class DatasetMeta:
    name: str
    task: str  # "classification" or "vqa"
    labels: list[str]  # the closed label set (classification classes, or the closed answers of a VQA set)
    source: str = ""
    license: str = ""
    description: str = ""
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of its bytes
    extra: dict[str, Any] = field(default_factory=dict)  # generator/converter parameters

    def to_yaml(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "labels": list(self.labels),
            "source": self.source,
            "license": self.license,
            "description": self.description,
            "checksums": dict(self.checksums),
            "extra": dict(self.extra),
        }


@dataclass
class Dataset:
    """A loaded dataset directory. Image fields of records are paths relative to `root`."""

    root: Path
    meta: DatasetMeta
    corpus: list[CorpusItem]
    queries: dict[str, list[Query]]

    def image_path(self, rel: str) -> Path:
        return self.root / rel

    def load_image(self, rel: str):
        """Open an image as RGB (PIL). Raises DatasetError naming the file when it does not decode."""
        return open_image(self.root / rel)

    @property
    def corpus_checksum(self) -> str:
        return self.meta.checksums.get(CORPUS_FILE) or sha256_file(self.root / CORPUS_FILE)

    def corpus_by_id(self) -> dict[str, CorpusItem]:
        return {item.id: item for item in self.corpus}

    def queries_by_id(self) -> dict[str, Query]:
        return {q.id: q for split in self.queries.values() for q in split}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f"{path}: image does not decode ({e}); expected a PNG or JPEG file") from None


# ---------------------------------------------------------------------------------------------------------- reading


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _field(obj: dict, name: str, kind: type | tuple, where: str, required: bool = True, default: Any = None):
    if name not in obj or obj[name] is None:
        if required:
            raise DatasetError(f"{where}: missing required field '{name}'")
        return default
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetError(f"{where}: field '{name}' must be {want}, got {type(value).__name__} {value!r:.60}")
    return value


def _check_image_field(root: Path, rel: str, where: str, decode: bool) -> None:
    path = root / rel
    if not path.is_file():
        raise DatasetError(f"{where}: field 'image': file {rel!r} not found under {root}")
    if decode:
        try:
            open_image(path)
        except DatasetError as e:
            raise DatasetError(f"{where}: field 'image': {e}") from None


def parse_corpus_item(obj: dict, where: str) -> CorpusItem:
    return CorpusItem(
        id=_field(obj, "id", str, where),
        image=_field(obj, "image", str, where),
        text=_field(obj, "text", str, where),
        label=_field(obj, "label", str, where, required=False),
        metadata=_field(obj, "metadata", dict, where, required=False, default={}),
    )


def parse_query(obj: dict, where: str) -> Query:
    candidates = _field(obj, "candidates", list, where)
    for i, c in enumerate(candidates):
        if not isinstance(c, str):
            raise DatasetError(f"{where}: field 'candidates'[{i}] must be str, got {type(c).__name__}")
    return Query(
        id=_field(obj, "id", str, where),
        image=_field(obj, "image", str, where),
        question=_field(obj, "question", str, where),
        candidates=tuple(candidates),
        label=_field(obj, "label", str, where),
        metadata=_field(obj, "metadata", dict, where, required=False, default={}),
    )


def load_meta(root: Path) -> DatasetMeta:
    path = root / META_FILE
    if not path.exists():
        raise DatasetError(f"{path}: file not found; a dataset directory holds {META_FILE}, {CORPUS_FILE}, "
                           f"queries-{{train,val,test}}.jsonl and images/")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected a mapping at top level")
    where = str(path)
    task = _field(raw, "task", str, where)
    if task not in TASKS:
        raise DatasetError(f"{where}: field 'task': {task!r} is not one of {list(TASKS)}")
    labels = _field(raw, "labels", list, where)
    if not labels or not all(isinstance(x, str) for x in labels):
        raise DatasetError(f"{where}: field 'labels' must be a non-empty list of strings")
    return DatasetMeta(
        name=_field(raw, "name", str, where),
        task=task,
        labels=labels,
        source=_field(raw, "source", str, where, required=False, default=""),
        license=_field(raw, "license", str, where, required=False, default=""),
        description=_field(raw, "description", str, where, required=False, default=""),
        checksums=_field(raw, "checksums", dict, where, required=False, default={}),
        extra=_field(raw, "extra", dict, where, required=False, default={}),
    )


def load_dataset(root: str | os.PathLike, decode_images: bool = False, verify_checksums: bool = True) -> Dataset:
    """Load and validate a dataset directory.

    Checks every record's fields and types, unique ids (corpus ids, and query ids across splits), labels inside the
    label set (classification; closed VQA questions), that every image file exists (and decodes, with
    `decode_images=True`), and the files' checksums against dataset.yaml.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    meta = load_meta(root)
    labels = set(meta.labels)
    if verify_checksums:
        for name, digest in meta.checksums.items():
            p = root / name
            if p.exists() and sha256_file(p) != digest:
                raise DatasetError(f"{p}: sha256 differs from the checksum in {META_FILE}; the file changed after "
                                   f"the dataset was written (regenerate it, or update the checksum on purpose)")

    corpus: list[CorpusItem] = []
    seen: dict[str, str] = {}
    path = root / CORPUS_FILE
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        item = parse_corpus_item(obj, where)
        if item.id in seen:
            raise DatasetError(f"{where}: field 'id': duplicate id {item.id!r} (first at {seen[item.id]})")
        seen[item.id] = where
        _check_image_field(root, item.image, where, decode_images)
        corpus.append(item)
    if not corpus:
        raise DatasetError(f"{path}: the corpus is empty")

    queries: dict[str, list[Query]] = {}
    qseen: dict[str, str] = {}
    for split in SPLITS:
        path = root / query_file(split)
        if not path.exists():
            continue
        rows = []
        for lineno, obj in _read_jsonl(path):
            where = f"{path}:{lineno}"
            q = parse_query(obj, where)
            if q.id in qseen:
                raise DatasetError(f"{where}: field 'id': duplicate query id {q.id!r} (first at {qseen[q.id]})")
            qseen[q.id] = where
            closed = meta.task == "classification" or q.metadata.get("answer_type", "closed") == "closed"
            if closed:
                if q.label not in labels:
                    raise DatasetError(f"{where}: field 'label': {q.label!r} is not in the label set {meta.labels}")
                bad = [c for c in q.candidates if c not in labels]
                if bad:
                    raise DatasetError(f"{where}: field 'candidates': {bad} not in the label set {meta.labels}")
                if q.label not in q.candidates:
                    raise DatasetError(f"{where}: field 'label': {q.label!r} is not among the candidates "
                                       f"{list(q.candidates)}")
            _check_image_field(root, q.image, where, decode_images)
            rows.append(q)
        queries[split] = rows
    if not queries:
        raise DatasetError(f"{root}: no query file; expected at least one of "
                           + ", ".join(query_file(s) for s in SPLITS))
    return Dataset(root=root, meta=meta, corpus=corpus, queries=queries)


# ---------------------------------------------------------------------------------------------------------- writing


class DatasetWriter:
    """Builds a dataset directory in a temporary sibling directory and renames it into place on success.

    with DatasetWriter(out, overwrite=False) as w:
        rel = w.add_image("c0001", pil_image)
        w.corpus.append(CorpusItem(...)); w.queries["train"].append(Query(...))
        w.meta = DatasetMeta(...)
    Nothing appears at `out` unless the block completes.
    """

    def __init__(self, out: str | os.PathLike, overwrite: bool = False):
        self.out = Path(out)
        self.overwrite = overwrite
        self.meta: DatasetMeta | None = None
        self.corpus: list[CorpusItem] = []
        self.queries: dict[str, list[Query]] = {s: [] for s in SPLITS}
        self._tmp: Path | None = None

    def __enter__(self) -> "DatasetWriter":
        if self.out.exists() and not self.overwrite:
            raise DatasetError(f"{self.out}: already exists (pass --overwrite to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        (self._tmp / "images").mkdir()
        return self

    def add_image(self, name: str, image) -> str:
        """Save a PIL image as images/<name>.png; returns the relative path to store in a record."""
        rel = f"images/{name}.png"
        image.save(self._tmp / rel, format="PNG", optimize=False)
        return rel

    def copy_image(self, src: Path, name: str) -> str:
        rel = f"images/{name}{src.suffix.lower()}"
        shutil.copyfile(src, self._tmp / rel)
        return rel

    def __exit__(self, exc_type, exc, tb) -> None:
        tmp = self._tmp
        assert tmp is not None
        if exc_type is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        try:
            if self.meta is None:
                raise DatasetError("DatasetWriter: meta was not set")
            _write_jsonl(tmp / CORPUS_FILE, (c.to_json() for c in self.corpus))
            files = [CORPUS_FILE]
            for split, rows in self.queries.items():
                if rows:
                    _write_jsonl(tmp / query_file(split), (q.to_json() for q in rows))
                    files.append(query_file(split))
            self.meta.checksums = {f: sha256_file(tmp / f) for f in files}
            (tmp / META_FILE).write_text(yaml.safe_dump(self.meta.to_yaml(), sort_keys=False), encoding="utf-8")
            load_dataset(tmp)  # never publish a dataset our own loader rejects
            replace_dir(tmp, self.out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
