"""The two-head Retriever: build_retriever writes both indexes with manifests, Retriever returns top-k per head,
untrained query towers give the frozen retriever's results, and another corpus is refused at load."""

from __future__ import annotations

import json

import pytest

from dxrag.core.retrieval.settings import IndexSettings
from dxrag.core.retrieval.encoders import TINY_MODEL
from dxrag.core.retrieval.heads import HEADS, query_towers
from dxrag.core.retrieval.index import MANIFEST_FILE, IndexMismatchError
from dxrag.core.retrieval.retriever import Retriever, build_retriever


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_encoder, toy_dataset):
    out = tmp_path_factory.mktemp("retriever") / "index"
    build_retriever(toy_dataset, tiny_encoder, out)
    return out


def test_build_writes_both_heads_with_manifests(built, tiny_encoder, toy_dataset):
    for head in HEADS:
        manifest = json.loads((built / head / MANIFEST_FILE).read_text())
        assert manifest["head"] == head and manifest["count"] == len(toy_dataset.corpus)
        assert manifest["encoder_name"] == TINY_MODEL
        assert manifest["encoder_weights_hash"] == tiny_encoder.weights_hash
        assert manifest["corpus_checksum"] == toy_dataset.corpus_checksum


def test_retrieve_returns_top_k_per_head(built, tiny_encoder, toy_dataset):
    retriever = Retriever.load(built, tiny_encoder, toy_dataset.corpus_checksum)
    items = toy_dataset.corpus[:3]
    hits = retriever.retrieve([toy_dataset.image_path(it.image) for it in items], k=4)
    corpus_ids = {it.id for it in toy_dataset.corpus}
    for head in HEADS:
        assert len(hits[head]) == 3 and all(len(h) == 4 for h in hits[head])
        for row in hits[head]:
            assert all(item_id in corpus_ids for item_id, _ in row)
            scores = [s for _, s in row]
            assert scores == sorted(scores, reverse=True)
    # a corpus image finds itself first on the image head
    assert [row[0][0] for row in hits["image"]] == [it.id for it in items]
    assert all(row[0][1] == pytest.approx(1.0, abs=1e-4) for row in hits["image"])
    excluded = retriever.retrieve([toy_dataset.image_path(items[0].image)], k=4, exclude=[{items[0].id}])
    assert excluded["image"][0][0][0] != items[0].id and len(excluded["image"][0]) == 4


def test_untrained_towers_give_the_frozen_retrievers_results(built, tiny_encoder, toy_dataset):
    retriever = Retriever.load(built, tiny_encoder)
    images = [toy_dataset.image_path(q.image) for q in toy_dataset.queries["val"]]
    frozen = retriever.retrieve(images, k=5)
    towered = retriever.retrieve(images, k=5, towers=query_towers(tiny_encoder))
    for head in HEADS:
        assert [[i for i, _ in row] for row in frozen[head]] == [[i for i, _ in row] for row in towered[head]]


def test_index_of_another_corpus_is_refused(built, tiny_encoder):
    with pytest.raises(IndexMismatchError, match="another corpus|corpus with checksum"):
        Retriever.load(built, tiny_encoder, corpus_checksum="0" * 64)


def test_approximate_index_measures_recall_on_query_images(tmp_path, tiny_encoder, toy_dataset):
    retriever = build_retriever(toy_dataset, tiny_encoder, tmp_path / "hnsw", IndexSettings(factory="hnsw"))
    for head in HEADS:
        recall = retriever.indexes[head].manifest.recall_vs_flat
        assert recall["queries"] == len(toy_dataset.queries["val"]) and recall["recall"] >= 0.9
