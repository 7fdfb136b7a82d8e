"""FAISS inner-product indexes over L2-normalised corpus embeddings (any `faiss.index_factory` string: Flat, IVF, HNSW,
PQ, ...), streamed to disk in chunks and saved with a manifest that binds each index to its encoder weights and corpus.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from .settings import INDEX_SHORTHANDS, IndexSettings
from ..base.dataset import Dataset
from ..base.fsutil import atomic_dir

log = logging.getLogger(__name__)

FORMAT = "dxrag-index/2"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
EMBEDDINGS_FILE = "embeddings.npy"
NORM_TOLERANCE = 1e-3


class IndexMismatchError(ValueError):
    """An index was built with another encoder or over another corpus than the one it is being used with."""


@dataclass
class IndexManifest:
    """manifest.json: what the index holds and what it was built from (checked by `load_index`)."""

    encoder_name: str
    encoder_weights_hash: str
    head: str  # which documents: "image" (image tower over corpus images) or "text" (text tower over corpus texts)
    dim: int
    count: int
    corpus_checksum: str
    factory: str  # the faiss.index_factory string built (shorthands resolved), metric inner product
    params: dict[str, Any]  # search/build parameters applied: nprobe, ef_search, ef_construction where they exist
    recall_vs_flat: dict[str, float] | None = None  # {"k", "queries", "recall"} for approximate indexes
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    dxrag_version: str = __version__
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "IndexManifest":
        if obj.get("format") == "dxrag-index/1":
            obj = _upgrade_v1(obj)
        if obj.get("format") != FORMAT:
            raise ValueError(f"{where}: field 'format' is {obj.get('format')!r}, expected {FORMAT!r}")
        names = set(cls.__dataclass_fields__)
        missing = [n for n in names if n not in obj]
        if missing:
            raise ValueError(f"{where}: missing field(s) {sorted(missing)}")
        return cls(**{k: obj[k] for k in names})


class CorpusIndex:
    """A loaded index: `search` returns corpus item ids; `embeddings` are the stored (memory-mapped) document rows."""

    def __init__(self, path: Path, index: faiss.Index, ids: list[str], manifest: IndexManifest):
        self.path = path
        self.index = index
        self.ids = ids
        self.manifest = manifest
        self._ids_array = np.asarray(ids + [""], dtype=object)  # row -1 (no result) maps to ""
        self._row_of: dict[str, int] | None = None
        self._embeddings: np.ndarray | None = None
        _apply_search_params(index, manifest.params)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def embeddings(self) -> np.ndarray:
        """(count, dim) float32 document embeddings, memory-mapped read-only from embeddings.npy."""
        if self._embeddings is None:
            self._embeddings = np.load(self.path / EMBEDDINGS_FILE, mmap_mode="r")
        return self._embeddings

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Corpus item ids -> row numbers in `embeddings`."""
        if self._row_of is None:
            self._row_of = {item_id: row for row, item_id in enumerate(self.ids)}
        try:
            return np.asarray([self._row_of[i] for i in ids], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"{self.path}: corpus item id {e.args[0]!r} is not in this index") from None

    def search_rows(self, query_embs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) L2-normalised queries -> scores (n, k) float32 and row numbers (n, k) int64, best first; where an
        approximate index finds fewer than k items, rows are -1 and scores -inf."""
        queries = _as_queries(query_embs, self.manifest.dim)
        k = min(int(k), len(self.ids))
        scores, rows = self.index.search(queries, k)
        scores = np.where(rows < 0, -np.inf, scores).astype(np.float32)
        return scores, rows

    def search(self, query_embs: np.ndarray, k: int,
               exclude: Sequence[Collection[str]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k corpus item ids per query: returns (scores (n, k) float32, ids (n, k) object array of str).

        `exclude[i]` lists item ids never to return for query i (e.g. items showing the query's own image); the
        search then looks further down the ranking so that k items are still returned when the corpus allows.
        Missing results (fewer than k items) have id "" and score -inf.
        """
        if exclude is None:
            scores, rows = self.search_rows(query_embs, k)
            return scores, self._ids_array[rows]
        if len(exclude) != len(query_embs):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(query_embs)} queries")
        extra = max((len(e) for e in exclude), default=0)
        scores, rows = self.search_rows(query_embs, k + extra)
        ids = self._ids_array[rows]
        out_scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(rows), k), "", dtype=object)
        for i, banned in enumerate(exclude):
            keep = [j for j in range(rows.shape[1]) if rows[i, j] >= 0 and ids[i, j] not in banned][:k]
            out_scores[i, :len(keep)] = scores[i, keep]
            out_ids[i, :len(keep)] = ids[i, keep]
        return out_scores, out_ids


# ---------------------------------------------------------------------------------------------------------- building


def write_index(out_dir: str | os.PathLike, ids: Sequence[str], chunks: Iterable[np.ndarray], *, dim: int,
                encoder_name: str, encoder_weights_hash: str, head: str, corpus_checksum: str,
                settings: IndexSettings | None = None, recall_queries: np.ndarray | None = None) -> CorpusIndex:
    """Stream embedding chunks (row order = `ids`) into embeddings.npy on disk, build the FAISS index from it chunk
    by chunk, measure recall against exact search for approximate indexes, and publish the directory atomically.

    Chunks must be float32-convertible (rows, dim) arrays of L2-normalised rows; their total must equal len(ids).
    Recall is measured on `recall_queries` (e.g. query-image embeddings; at most `settings.recall_queries` are used)
    or, without them, on a sample of the corpus vectors themselves (an optimistic estimate).
    """
    settings = settings or IndexSettings()
    settings.validate()
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("write_index: corpus item ids are not unique")
    if not ids:
        raise ValueError("write_index: no corpus items to index")
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        vectors = np.lib.format.open_memmap(tmp / EMBEDDINGS_FILE, mode="w+", dtype=np.float32, shape=(len(ids), dim))
        filled = 0
        for chunk in chunks:
            chunk = _check_rows(chunk, dim, f"embedding chunk at row {filled}")
            if filled + len(chunk) > len(ids):
                raise ValueError(f"write_index: chunks hold more than the {len(ids)} rows of `ids`")
            vectors[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
        if filled != len(ids):
            raise ValueError(f"write_index: chunks hold {filled} rows but there are {len(ids)} ids")
        vectors.flush()
        factory = resolve_factory(settings.factory, len(ids))
        index, params = _build_faiss(vectors, factory, settings)
        recall = None
        if not is_exact(factory):
            recall = _measure_recall(index, vectors, settings, recall_queries)
            log.info("%s index over %d %s embeddings: recall@%d vs flat = %.4f (%d queries)", factory, len(ids),
                     head, recall["k"], recall["recall"], recall["queries"])
        manifest = IndexManifest(encoder_name=encoder_name, encoder_weights_hash=encoder_weights_hash, head=head,
                                 dim=dim, count=len(ids), corpus_checksum=corpus_checksum, factory=factory,
                                 params=params, recall_vs_flat=recall)
        del vectors
        faiss.write_index(index, str(tmp / INDEX_FILE))
        (tmp / IDS_FILE).write_text(json.dumps(ids), encoding="utf-8")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2), encoding="utf-8")
    return CorpusIndex(out, index, ids, manifest)


def build_index(out_dir: str | os.PathLike, embeddings: np.ndarray, ids: Sequence[str], *, encoder_name: str,
                encoder_weights_hash: str, head: str, corpus_checksum: str, settings: IndexSettings | None = None,
                recall_queries: np.ndarray | None = None, chunk_size: int = 65536) -> CorpusIndex:
    """`write_index` for embeddings already in memory."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"build_index: embeddings must be 2-D (n, dim), got shape {embeddings.shape}")
    chunks = (embeddings[i:i + chunk_size] for i in range(0, len(embeddings), chunk_size))
    return write_index(out_dir, ids, chunks, dim=embeddings.shape[1], encoder_name=encoder_name,
                       encoder_weights_hash=encoder_weights_hash, head=head, corpus_checksum=corpus_checksum,
                       settings=settings, recall_queries=recall_queries)


def index_corpus(dataset: Dataset, encoder, head: str, out_dir: str | os.PathLike,
                 settings: IndexSettings | None = None, chunk_size: int = 4096, batch_size: int = 256,
                 recall_queries: np.ndarray | None = None) -> CorpusIndex:
    """Embed the dataset's corpus with one frozen tower (head "image": images; "text": report texts), one chunk of
    `chunk_size` items at a time with a progress bar, and write the index to `out_dir` (see `write_index`)."""
    if head not in ("image", "text"):
        raise ValueError(f"head {head!r} is not one of ['image', 'text']")
    items = dataset.corpus

    def chunks() -> Iterator[np.ndarray]:
        bar = tqdm(total=len(items), desc=f"embed corpus ({head})", unit="item")
        try:
            for start in range(0, len(items), chunk_size):
                part = items[start:start + chunk_size]
                if head == "image":
                    yield encoder.encode_images([dataset.image_path(it.image) for it in part], batch_size=batch_size)
                else:
                    yield encoder.encode_texts([it.text for it in part], batch_size=batch_size)
                bar.update(len(part))
        finally:
            bar.close()

    return write_index(out_dir, [it.id for it in items], chunks(), dim=encoder.dim, encoder_name=encoder.name,
                       encoder_weights_hash=encoder.weights_hash, head=head,
                       corpus_checksum=dataset.corpus_checksum, settings=settings, recall_queries=recall_queries)


# ---------------------------------------------------------------------------------------------------------- loading


def load_index(path: str | os.PathLike, encoder=None, corpus_checksum: str | None = None) -> CorpusIndex:
    """Load an index directory. With `encoder`, refuse an index built with another encoder name or other weights;
    with `corpus_checksum`, refuse an index built over another corpus (IndexMismatchError naming both values)."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not found; an index directory holds {MANIFEST_FILE}, "
                                f"{INDEX_FILE}, {IDS_FILE} and {EMBEDDINGS_FILE} (written by write_index)")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{manifest_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    manifest = IndexManifest.from_json(raw, str(manifest_path))
    if encoder is not None:
        if manifest.encoder_name != encoder.name or manifest.encoder_weights_hash != encoder.weights_hash:
            raise IndexMismatchError(
                f"{manifest_path}: index built with encoder {manifest.encoder_name!r} (weights sha256 "
                f"{manifest.encoder_weights_hash}), but the encoder in use is {encoder.name!r} (weights sha256 "
                f"{encoder.weights_hash}); rebuild the index with this encoder or load the encoder it was built with")
    if corpus_checksum is not None and manifest.corpus_checksum != corpus_checksum:
        raise IndexMismatchError(
            f"{manifest_path}: index built over a corpus with checksum {manifest.corpus_checksum}, but the corpus in "
            f"use has checksum {corpus_checksum}; rebuild the index for this corpus")
    index = faiss.read_index(str(path / INDEX_FILE))
    ids = json.loads((path / IDS_FILE).read_text(encoding="utf-8"))
    if index.ntotal != manifest.count or len(ids) != manifest.count or index.d != manifest.dim:
        raise ValueError(f"{path}: index holds {index.ntotal} vectors of dim {index.d} and {IDS_FILE} {len(ids)} "
                         f"ids, but the manifest says count {manifest.count}, dim {manifest.dim}")
    return CorpusIndex(path, index, ids, manifest)


# ---------------------------------------------------------------------------------------------------------- recall


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int, chunk_size: int = 65536
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over (possibly memory-mapped) vectors, reading them chunk by chunk."""
    queries = _as_queries(queries, vectors.shape[1])
    k = min(k, len(vectors))
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_r = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(vectors), chunk_size):
        scores = queries @ np.asarray(vectors[start:start + chunk_size], dtype=np.float32).T
        rows = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        s = np.concatenate([best_s, scores], axis=1)
        r = np.concatenate([best_r, rows], axis=1)
        top = np.argpartition(-s, min(k, s.shape[1]) - 1, axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(s, top, 1), np.take_along_axis(r, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)


def recall_vs_flat(index: CorpusIndex | faiss.Index, flat: CorpusIndex | faiss.Index, queries: np.ndarray,
                   k: int) -> float:
    """Mean fraction of the exact (flat) top-k results that the approximate index also returns in its top-k."""
    queries = _as_queries(queries, flat.d if isinstance(flat, faiss.Index) else flat.manifest.dim)
    rows_a = _raw_search(index, queries, k)
    rows_f = _raw_search(flat, queries, k)
    hits = [len(set(a[a >= 0]) & set(f[f >= 0])) / max(1, int((f >= 0).sum())) for a, f in zip(rows_a, rows_f)]
    return float(np.mean(hits)) if hits else 1.0


def _raw_search(index: CorpusIndex | faiss.Index, queries: np.ndarray, k: int) -> np.ndarray:
    if isinstance(index, CorpusIndex):
        return index.search_rows(queries, k)[1]
    return index.search(queries, min(k, index.ntotal))[1]


def _measure_recall(index: faiss.Index, vectors: np.ndarray, settings: IndexSettings,
                    queries: np.ndarray | None) -> dict[str, float]:
    rng = np.random.default_rng(0)
    if queries is None:
        sample = np.sort(rng.choice(len(vectors), size=min(settings.recall_queries, len(vectors)), replace=False))
        queries = np.asarray(vectors[sample], dtype=np.float32)
    else:
        queries = _as_queries(queries, vectors.shape[1])[:settings.recall_queries]
    n_queries = len(queries)
    k = min(settings.recall_k, len(vectors))
    exact_rows = exact_search(vectors, queries, k)[1]
    approx_rows = index.search(queries, k)[1]
    hits = [len(set(a[a >= 0]) & set(e)) / k for a, e in zip(approx_rows, exact_rows)]
    return {"k": k, "queries": n_queries, "recall": float(np.mean(hits))}


# ---------------------------------------------------------------------------------------------------------- helpers


def resolve_factory(factory: str, n: int) -> str:
    """A shorthand (flat, ivf, hnsw) -> its faiss.index_factory string for `n` vectors; other strings unchanged."""
    factory = factory.strip()
    template = INDEX_SHORTHANDS.get(factory, factory)
    if "{nlist}" in template:
        template = template.format(nlist=max(1, min(int(4 * np.sqrt(n)), n // 39)))
    return template


def is_exact(factory: str) -> bool:
    return factory in ("Flat", "flat")


# faiss.ParameterSpace names of the settings that are search-time parameters
_SEARCH_PARAMS = {"nprobe": "nprobe", "ef_search": "efSearch"}


def _build_faiss(vectors: np.ndarray, factory: str, settings: IndexSettings,
                 chunk_size: int = 65536) -> tuple[faiss.Index, dict[str, Any]]:
    n, dim = vectors.shape
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1]
        raise ValueError(f"index factory {factory!r} is not valid for faiss.index_factory ({detail}); valid: a "
                         f"shorthand {sorted(INDEX_SHORTHANDS)} or a string such as 'Flat', 'IVF256,Flat', "
                         f"'HNSW32', 'IVF1024,PQ16'") from None
    params: dict[str, Any] = {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.nlist > n:
        raise ValueError(f"index factory {factory!r}: {ivf.nlist} IVF cells for {n} vectors; choose at most {n} "
                         f"cells (about 4·sqrt(n) = {int(4 * np.sqrt(n))}), or the 'ivf' shorthand")
    top = faiss.downcast_index(index)
    if hasattr(top, "hnsw"):
        top.hnsw.efConstruction = settings.ef_construction
        params["ef_construction"] = settings.ef_construction
    if not index.is_trained:
        nlist = ivf.nlist if ivf is not None else 0
        n_train = min(n, max(256 * nlist, 10000))
        sample = np.sort(np.random.default_rng(0).choice(n, size=n_train, replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    for start in tqdm(range(0, n, chunk_size), desc=f"add to {factory} index", unit="chunk",
                      disable=n <= chunk_size):
        index.add(np.ascontiguousarray(vectors[start:start + chunk_size], dtype=np.float32))
    space = faiss.ParameterSpace()
    for name, faiss_name in _SEARCH_PARAMS.items():
        value = getattr(settings, name)
        if name == "nprobe" and ivf is not None:
            value = min(value, ivf.nlist)
        try:
            space.set_index_parameter(index, faiss_name, value)
        except RuntimeError:  # the index has no such parameter (e.g. nprobe of an HNSW index)
            continue
        params[name] = value
    return index, params


def _apply_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    space = faiss.ParameterSpace()
    for name, faiss_name in _SEARCH_PARAMS.items():
        if name in params:
            space.set_index_parameter(index, faiss_name, int(params[name]))


def _upgrade_v1(obj: dict[str, Any]) -> dict[str, Any]:
    """A dxrag-index/1 manifest (kind flat|ivf|hnsw and hand-built indexes) in the current format."""
    obj = dict(obj)
    kind, params = obj.pop("kind", None), dict(obj.get("params") or {})
    factories = {"flat": lambda: "Flat", "ivf": lambda: f"IVF{params.pop('nlist')},Flat",
                 "hnsw": lambda: f"HNSW{params.pop('hnsw_m')}"}
    if kind not in factories:
        return obj  # from_json reports the missing field
    obj.update(factory=factories[kind](), params=params, format=FORMAT)
    return obj


def _check_rows(chunk: np.ndarray, dim: int, where: str) -> np.ndarray:
    chunk = np.asarray(chunk, dtype=np.float32)
    if chunk.ndim != 2 or chunk.shape[1] != dim:
        raise ValueError(f"{where}: expected shape (rows, {dim}), got {chunk.shape}")
    if not np.isfinite(chunk).all():
        raise ValueError(f"{where}: embeddings contain NaN or infinite values")
    norms = np.linalg.norm(chunk, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
    if len(bad):
        raise ValueError(f"{where}: row {bad[0]} has L2 norm {norms[bad[0]]:.4f}; inner-product search needs "
                         f"L2-normalised embeddings (norm 1 ± {NORM_TOLERANCE})")
    return chunk


def _as_queries(query_embs: np.ndarray, dim: int) -> np.ndarray:
    q = np.ascontiguousarray(np.asarray(query_embs, dtype=np.float32))
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"query embeddings must have shape (n, {dim}), got {np.shape(query_embs)}")
    return q

