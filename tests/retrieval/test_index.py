"""FAISS indexes: exact search equals brute force, approximate kinds report their recall against flat, streamed
building equals in-memory building, and the manifest refuses another encoder or corpus."""

from __future__ import annotations

import json
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from dxrag.core.retrieval.index import (EMBEDDINGS_FILE, MANIFEST_FILE, IndexMismatchError, IndexSpec, build_index,
                                        exact_search, index_corpus, load_index, recall_vs_flat, write_index)

ENC = SimpleNamespace(name="enc-a", weights_hash="a" * 64)


def unit_rows(n: int, dim: int, seed: int = 0, clusters: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    if clusters:
        centres = rng.normal(size=(clusters, dim)) * 3
        x += centres[rng.integers(0, clusters, n)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(path, vectors, spec=None, encoder=ENC, checksum="corpus-1", head="image"):
    ids = [f"item{i}" for i in range(len(vectors))]
    return build_index(path, vectors, ids, encoder_name=encoder.name, encoder_weights_hash=encoder.weights_hash,
                       head=head, corpus_checksum=checksum, spec=spec)


def test_flat_search_matches_brute_force(tmp_path):
    docs, queries = unit_rows(300, 16), unit_rows(20, 16, seed=1)
    index = build(tmp_path / "flat", docs)
    scores, ids = index.search(queries, 7)
    brute = queries @ docs.T
    order = np.argsort(-brute, axis=1)[:, :7]
    assert ids.shape == (20, 7)
    assert [[f"item{j}" for j in row] for row in order] == ids.tolist()
    np.testing.assert_allclose(scores, np.take_along_axis(brute, order, 1), atol=1e-5)
    e_scores, e_rows = exact_search(docs, queries, 7, chunk_size=64)
    assert np.array_equal(e_rows, order)


@pytest.mark.parametrize("spec", [IndexSpec(kind="ivf", nlist=16, nprobe=6), IndexSpec(kind="hnsw", hnsw_m=16)],
                         ids=["ivf", "hnsw"])
def test_approximate_index_recall_is_measured_and_high(tmp_path, spec):
    docs, queries = unit_rows(3000, 32, clusters=24), unit_rows(100, 32, seed=5, clusters=24)
    flat = build(tmp_path / "flat", docs)
    approx = build(tmp_path / spec.kind, docs, spec)
    recorded = approx.manifest.recall_vs_flat
    measured = recall_vs_flat(approx, flat, queries, 10)
    print(f"{spec.kind}: recall@10 vs flat {measured:.3f} (build-time estimate {recorded['recall']:.3f})")
    assert recorded["k"] == 10 and recorded["queries"] == 256
    assert recorded["recall"] >= 0.9 and measured >= 0.9
    assert recall_vs_flat(flat, flat.index, queries, 10) == 1.0
    reloaded = load_index(tmp_path / spec.kind, ENC, "corpus-1")
    assert np.array_equal(reloaded.search(queries, 10)[1], approx.search(queries, 10)[1])


def test_index_from_other_encoder_or_corpus_is_refused(tmp_path):
    build(tmp_path / "idx", unit_rows(50, 8))
    assert len(load_index(tmp_path / "idx", ENC, "corpus-1")) == 50
    other = SimpleNamespace(name="enc-a", weights_hash="b" * 64)
    with pytest.raises(IndexMismatchError) as err:
        load_index(tmp_path / "idx", other, "corpus-1")
    assert "a" * 64 in str(err.value) and "b" * 64 in str(err.value)
    with pytest.raises(IndexMismatchError, match="enc-z"):
        load_index(tmp_path / "idx", SimpleNamespace(name="enc-z", weights_hash="a" * 64))
    with pytest.raises(IndexMismatchError) as err:
        load_index(tmp_path / "idx", ENC, "corpus-2")
    assert "corpus-1" in str(err.value) and "corpus-2" in str(err.value)


def test_manifest_records_what_the_index_was_built_from(tmp_path):
    build(tmp_path / "idx", unit_rows(40, 8), head="text")
    manifest = json.loads((tmp_path / "idx" / MANIFEST_FILE).read_text())
    assert manifest["encoder_name"] == "enc-a" and manifest["encoder_weights_hash"] == "a" * 64
    assert (manifest["head"], manifest["dim"], manifest["count"], manifest["kind"]) == ("text", 8, 40, "flat")
    assert manifest["corpus_checksum"] == "corpus-1" and manifest["created"] and manifest["dxrag_version"]


def test_streamed_chunks_equal_in_memory_build(tmp_path):
    docs, queries = unit_rows(103, 12), unit_rows(9, 12, seed=3)
    ids = [f"item{i}" for i in range(103)]
    whole = build(tmp_path / "whole", docs)
    streamed = write_index(tmp_path / "streamed", ids, (docs[i:i + 10] for i in range(0, 103, 10)), dim=12,
                           encoder_name="enc-a", encoder_weights_hash="a" * 64, head="image",
                           corpus_checksum="corpus-1")
    assert np.array_equal(np.load(tmp_path / "streamed" / EMBEDDINGS_FILE), docs)
    assert np.array_equal(streamed.embeddings, whole.embeddings)
    s1, i1 = whole.search(queries, 5)
    s2, i2 = streamed.search(queries, 5)
    assert np.array_equal(i1, i2) and np.array_equal(s1, s2)


def test_index_corpus_in_chunks_equals_encoding_at_once(tmp_path, tiny_encoder, toy_dataset):
    index = index_corpus(toy_dataset, tiny_encoder, "text", tmp_path / "text", chunk_size=7, batch_size=5)
    expected = tiny_encoder.encode_texts([it.text for it in toy_dataset.corpus])
    np.testing.assert_allclose(index.embeddings, expected, atol=1e-5)
    assert index.ids == [it.id for it in toy_dataset.corpus]
    assert index.manifest.corpus_checksum == toy_dataset.corpus_checksum


def test_bad_embeddings_are_refused_and_nothing_is_published(tmp_path):
    docs = unit_rows(20, 4)
    with pytest.raises(ValueError, match="L2 norm"):
        build(tmp_path / "idx", docs * 2)
    with pytest.raises(ValueError, match="more than the 19 rows"):
        write_index(tmp_path / "idx", [f"i{k}" for k in range(19)], [docs], dim=4, encoder_name="e",
                    encoder_weights_hash="h", head="image", corpus_checksum="c")
    assert list(tmp_path.iterdir()) == []


def test_search_excludes_given_items(tmp_path):
    docs = unit_rows(30, 8)
    index = build(tmp_path / "idx", docs)
    _, plain = index.search(docs[:2], 3)
    assert plain[0, 0] == "item0" and plain[1, 0] == "item1"
    scores, ids = index.search(docs[:2], 3, exclude=[{"item0"}, set()])
    assert ids[0].tolist() == plain[0, 1:].tolist() + [index.search(docs[:1], 4)[1][0, 3]]
    assert ids[1].tolist() == plain[1].tolist()
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_write_index_is_a_faiss_inner_product_index(tmp_path):
    index = build(tmp_path / "idx", unit_rows(10, 4))
    assert isinstance(index.index, faiss.IndexFlatIP) and index.index.metric_type == faiss.METRIC_INNER_PRODUCT
