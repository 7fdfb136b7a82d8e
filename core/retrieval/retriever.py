"""The two-head retriever over one corpus: `build_retriever` embeds the corpus with both frozen towers and writes the
image and text indexes; `Retriever` loads them and returns the top-k (item_id, score) per head for query images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Collection, Mapping, Sequence

import numpy as np

from .settings import IndexSettings
from ..base.dataset import Dataset
from .encoders import Encoder, ImageLike
from .heads import HEADS, QueryTower
from .index import CorpusIndex, index_corpus, is_exact, load_index, resolve_factory

Hits = list[list[tuple[str, float]]]  # per query: [(item_id, score), ...] best first


def build_retriever(dataset: Dataset, encoder: Encoder, out_dir: str | os.PathLike,
                    settings: IndexSettings | None = None, chunk_size: int = 4096,
                    batch_size: int = 256) -> "Retriever":
    """Write `out_dir/image` (image tower over corpus images) and `out_dir/text` (text tower over report texts),
    each with its manifest, and return the loaded Retriever. `settings` is the index type and its parameters
    (default: exact Flat). For approximate indexes, recall against flat is measured on the dataset's query images
    (val split first)."""
    settings = settings or IndexSettings()
    settings.validate()
    out = Path(out_dir)
    recall_queries = None
    if not is_exact(resolve_factory(settings.factory, len(dataset.corpus))):
        splits = sorted(dataset.queries, key=lambda s: (s != "val", s))
        queries = [q for split in splits for q in dataset.queries[split]][:settings.recall_queries]
        if queries:
            recall_queries = encoder.encode_images([dataset.image_path(q.image) for q in queries], batch_size)
    indexes = {head: index_corpus(dataset, encoder, head, out / head, settings, chunk_size, batch_size,
                                  recall_queries) for head in HEADS}
    return Retriever(encoder, indexes)


class Retriever:
    """Both heads' indexes plus the encoder. Query embeddings come from the frozen image tower (the untrained
    retriever) or, per head, from trained `QueryTower`s; documents are never re-embedded."""

    def __init__(self, encoder: Encoder, indexes: Mapping[str, CorpusIndex]):
        missing = [h for h in HEADS if h not in indexes]
        if missing:
            raise ValueError(f"Retriever needs an index per head {list(HEADS)}; missing {missing}")
        self.encoder = encoder
        self.indexes = dict(indexes)

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: Encoder, corpus_checksum: str | None = None) -> "Retriever":
        """Load `path/image` and `path/text`, refusing indexes built with another encoder or corpus."""
        path = Path(path)
        return cls(encoder, {head: load_index(path / head, encoder, corpus_checksum) for head in HEADS})

    def query_embeddings(self, images: Sequence[ImageLike], towers: Mapping[str, QueryTower] | None = None,
                         batch_size: int = 256) -> dict[str, np.ndarray]:
        """Query images -> {head: (n, dim) embeddings}; without `towers` both heads use the frozen image tower."""
        pixels = self.encoder.preprocess_images(images)
        if towers is None:
            frozen = self.encoder.encode_image_tensor(pixels, batch_size)
            return {head: frozen for head in HEADS}
        return {head: towers[head].embed(pixels, batch_size) for head in HEADS}

    def search(self, query_embs: Mapping[str, np.ndarray], k: int,
               exclude: Sequence[Collection[str]] | None = None) -> dict[str, Hits]:
        """{head: (n, dim) query embeddings} -> {head: per query the top-k [(item_id, score), ...]} for the heads
        given. `exclude[i]` holds item ids never returned for query i."""
        out: dict[str, Hits] = {}
        for head, embs in query_embs.items():
            if head not in self.indexes:
                raise ValueError(f"unknown head {head!r}; valid: {list(HEADS)}")
            scores, ids = self.indexes[head].search(embs, k, exclude)
            out[head] = [[(str(i), float(s)) for i, s in zip(row_ids, row_scores) if i != ""]
                         for row_ids, row_scores in zip(ids, scores)]
        return out

    def retrieve(self, images: Sequence[ImageLike], k: int, towers: Mapping[str, QueryTower] | None = None,
                 exclude: Sequence[Collection[str]] | None = None) -> dict[str, Hits]:
        """Query images -> {head: top-k [(item_id, score), ...] per query}."""
        return self.search(self.query_embeddings(images, towers), k, exclude)
