"""The on-disk dataset format (a directory) and its validating loader and atomic writer.

Layout: dataset.yaml, corpus.jsonl, queries-{train,val,test}.jsonl, images/*.png. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from .fsutil import make_temp_dir, replace_dir
from .jsonl import iter_jsonl
from .answers import CLOSED, EMPTY_SET, OPEN, SET_SEPARATOR, normalize_closed
from .records import CorpusItem, Query


SPLITS = ("train", "val", "test")
TASKS = ("classification", "multilabel", "vqa")
QUERY_ANSWER_TYPES = (CLOSED, OPEN)  # a query's metadata answer_type (vqa datasets); sets are a dataset task
CORPUS_FILE = "corpus.jsonl"
META_FILE = "dataset.yaml"


def query_file(split: str) -> str:
    return f"queries-{split}.jsonl"


class DatasetError(ValueError):
    """Invalid dataset directory or record; the message names the file, line and field and what would be valid."""


@dataclass
class DatasetMeta:
    """dataset.yaml. `task`: "classification" (one label per query), "multilabel" (a query's label is a set of
    labels) or "vqa" (closed questions answered from candidates, open ones with free text)."""

    name: str
    task: str
    labels: list[str]  # the closed label set (classes, the findings of a multi-label task, closed VQA answers)
    source: str = ""
    license: str = ""
    description: str = ""
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> sha256 of its bytes
    extra: dict[str, Any] = field(default_factory=dict)  # generator/converter parameters
    allow_empty: bool = False  # multilabel only: a query may have no label at all ("no finding")
    legend: dict[str, str] = field(default_factory=dict)  # label -> what it means, for numbered classes

    def to_yaml(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "task": self.task,
            "labels": list(self.labels),
        }
        if self.task == "multilabel":
            out["allow_empty"] = self.allow_empty
        if self.legend:
            out["legend"] = dict(self.legend)
        out.update({
            "source": self.source,
            "license": self.license,
            "description": self.description,
            "checksums": dict(self.checksums),
            "extra": dict(self.extra),
        })
        return out


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
    return iter_jsonl(path, error=DatasetError)


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


def _str_list(obj: dict, name: str, where: str) -> list[str]:
    values = _field(obj, name, list, where)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DatasetError(f"{where}: field '{name}'[{i}] must be str, got {type(v).__name__}")
    return values


def parse_query(obj: dict, where: str, meta: DatasetMeta | None = None) -> Query:
    """One query record. With a multilabel `meta`, `label` is a JSON list validated against the label set and stored
    as `label_set` in label-set order (plus its canonical string as `label`)."""
    candidates = _str_list(obj, "candidates", where)
    fields = dict(
        id=_field(obj, "id", str, where),
        image=_field(obj, "image", str, where),
        question=_field(obj, "question", str, where),
        candidates=tuple(candidates),
        metadata=_field(obj, "metadata", dict, where, required=False, default={}),
    )
    if meta is None or meta.task != "multilabel":
        if isinstance(obj.get("label"), list):
            raise DatasetError(f"{where}: field 'label' must be str, got a list {obj['label']!r:.60} (a list of "
                               f"labels is valid only in a dataset with task: multilabel)")
        return Query(label=_field(obj, "label", str, where), **fields)
    if "label" in obj and not isinstance(obj["label"], list):
        raise DatasetError(f"{where}: field 'label' must be a JSON list of labels from {meta.labels} (task "
                           f"multilabel), got {type(obj['label']).__name__} {obj['label']!r:.60}")
    members = _str_list(obj, "label", where)
    known = set(meta.labels)
    bad = [m for m in members if m not in known]
    if bad:
        raise DatasetError(f"{where}: field 'label': {bad} not in the label set {meta.labels}")
    dup = sorted({m for m in members if members.count(m) > 1})
    if dup:
        raise DatasetError(f"{where}: field 'label': {dup} listed more than once; a label set names each label once")
    if not members and not meta.allow_empty:
        raise DatasetError(f"{where}: field 'label': the empty set is not allowed in this dataset (dataset.yaml "
                           f"allow_empty is false); list at least one of {meta.labels}")
    chosen = set(members)
    return Query(label="", label_set=tuple(x for x in meta.labels if x in chosen), **fields)


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
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise DatasetError(f"{where}: field 'labels': {dup} listed more than once")
    allow_empty = _field(raw, "allow_empty", bool, where, required=False, default=False)
    if "allow_empty" in raw and task != "multilabel":
        raise DatasetError(f"{where}: field 'allow_empty' is valid only with task: multilabel (task is {task!r})")
    if task == "multilabel":
        check_multilabel_labels(labels, where)
    return DatasetMeta(
        name=_field(raw, "name", str, where),
        task=task,
        labels=labels,
        source=_field(raw, "source", str, where, required=False, default=""),
        license=_field(raw, "license", str, where, required=False, default=""),
        description=_field(raw, "description", str, where, required=False, default=""),
        checksums=_field(raw, "checksums", dict, where, required=False, default={}),
        extra=_field(raw, "extra", dict, where, required=False, default={}),
        allow_empty=allow_empty,
        legend=_parse_legend(raw, labels, where),
    )


def check_multilabel_labels(labels: list[str], where: str) -> None:
    """Labels of a set-valued task must survive the canonical string form: no separator inside, distinct after
    normalisation, and not the empty set's own string."""
    sep = SET_SEPARATOR.strip()
    bad = [x for x in labels if sep in x or not x.strip()]
    if bad:
        raise DatasetError(f"{where}: field 'labels': {bad}: multilabel labels must be non-empty and contain no "
                           f"{sep!r} (answers list labels separated by {SET_SEPARATOR!r})")
    seen: dict[str, str] = {}
    for x in labels:
        n = normalize_closed(x)
        if n in seen:
            raise DatasetError(f"{where}: field 'labels': {seen[n]!r} and {x!r} are the same answer after "
                               f"strip + casefold")
        seen[n] = x
    if EMPTY_SET in seen:
        raise DatasetError(f"{where}: field 'labels': {seen[EMPTY_SET]!r} is reserved in a multilabel task "
                           f"(it is the answer for the empty set); rename that label")


def _parse_legend(raw: dict, labels: list[str], where: str) -> dict[str, str]:
    """`legend`: a mapping label -> description covering every label exactly (YAML integer keys count as strings)."""
    legend = _field(raw, "legend", dict, where, required=False, default={})
    out: dict[str, str] = {}
    for key, text in legend.items():
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise DatasetError(f"{where}: field 'legend': key {key!r} must be a label (str)")
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where}: field 'legend'[{key!r}] must be a non-empty string, got {text!r:.60}")
        out[str(key)] = text.strip()
    if out:
        extra = [k for k in out if k not in labels]
        missing = [x for x in labels if x not in out]
        if extra or missing:
            raise DatasetError(f"{where}: field 'legend' must describe every label in {labels} and nothing else"
                               + (f"; not labels: {extra}" if extra else "")
                               + (f"; missing: {missing}" if missing else ""))
    return out


def load_dataset(root: str | os.PathLike, decode_images: bool = False, verify_checksums: bool = True) -> Dataset:
    """Load and validate a dataset directory.

    Checks every record's fields and types, unique ids (corpus ids, and query ids across splits), labels inside the
    label set (classification; closed VQA questions; every member of a multilabel query's set), non-empty answers of
    open VQA questions, that every image file exists (and decodes, with `decode_images=True`), and the files'
    checksums against dataset.yaml.
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
            q = parse_query(obj, where, meta)
            if q.id in qseen:
                raise DatasetError(f"{where}: field 'id': duplicate query id {q.id!r} (first at {qseen[q.id]})")
            qseen[q.id] = where
            _check_answer_type(q, meta, where)
            if meta.task == "multilabel":
                bad = [c for c in q.candidates if c not in labels]
                if bad or not q.candidates:
                    raise DatasetError(f"{where}: field 'candidates': " + (f"{bad} not in the label set {meta.labels}"
                                       if bad else f"empty; list the labels offered, a subset of {meta.labels}"))
                missing = [m for m in q.label_set if m not in q.candidates]
                if missing:
                    raise DatasetError(f"{where}: field 'label': {missing} not among the candidates "
                                       f"{list(q.candidates)}")
            elif q.answer_type == OPEN:
                if not q.label.strip():
                    raise DatasetError(f"{where}: field 'label': empty; an open question needs its free-text answer")
            else:
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


def _check_answer_type(q: Query, meta: DatasetMeta, where: str) -> None:
    value = q.metadata.get("answer_type")
    if value is None:
        return
    valid = QUERY_ANSWER_TYPES if meta.task == "vqa" else (CLOSED,)
    if value not in valid:
        raise DatasetError(f"{where}: field 'metadata.answer_type': {value!r} is not one of {list(valid)} "
                           f"(task {meta.task})")


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
        self._tmp = make_temp_dir(self.out)  # mode from the umask, not tempfile's private 0700
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

    def add_image_bytes(self, name: str, data: bytes, suffix: str) -> str:
        """Store an encoded image (e.g. the PNG/JPEG bytes of a parquet column) unchanged as images/<name><suffix>."""
        rel = f"images/{name}{suffix}"
        (self._tmp / rel).write_bytes(data)
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
