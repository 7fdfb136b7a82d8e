"""FAISS indexes: exact search equals brute force, index types come from faiss.index_factory strings (YAML-settable
with their search parameters), approximate ones report their recall against flat, streamed building equals in-memory
building, and the manifest refuses another encoder or corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from dxrag.core.config import ConfigError, load_config
from dxrag.core.retrieval.settings import IndexSettings
from dxrag.core.retrieval.index import (EMBEDDINGS_FILE, MANIFEST_FILE, IndexMismatchError, build_index, exact_search,
                                        index_corpus, load_index, recall_vs_flat, write_index)

ENC = SimpleNamespace(name="enc-a", weights_hash="a" * 64)


def unit_rows(n: int, dim: int, seed: int = 0, clusters: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    if clusters:
        centres = rng.normal(size=(clusters, dim)) * 3
        x += centres[rng.integers(0, clusters, n)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(path, vectors, settings=None, encoder=ENC, checksum="corpus-1", head="image"):
    ids = [f"item{i}" for i in range(len(vectors))]
    return build_index(path, vectors, ids, encoder_name=encoder.name, encoder_weights_hash=encoder.weights_hash,
                       head=head, corpus_checksum=checksum, settings=settings)


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


@pytest.mark.parametrize("settings", [IndexSettings(factory="IVF16,Flat", nprobe=6), IndexSettings(factory="HNSW16"),
                                      IndexSettings(factory="ivf")], ids=["IVF16,Flat", "HNSW16", "ivf"])
def test_approximate_index_recall_is_measured_and_high(tmp_path, settings):
    docs, queries = unit_rows(3000, 32, clusters=24), unit_rows(100, 32, seed=5, clusters=24)
    flat = build(tmp_path / "flat", docs)
    approx = build(tmp_path / "approx", docs, settings)
    recorded = approx.manifest.recall_vs_flat
    measured = recall_vs_flat(approx, flat, queries, 10)
    print(f"{approx.manifest.factory}: recall@10 vs flat {measured:.3f} (build-time estimate "
          f"{recorded['recall']:.3f})")
    assert recorded["k"] == 10 and recorded["queries"] == 256
    assert recorded["recall"] >= 0.9 and measured >= 0.9
    assert recall_vs_flat(flat, flat.index, queries, 10) == 1.0
    reloaded = load_index(tmp_path / "approx", ENC, "corpus-1")
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
    assert (manifest["head"], manifest["dim"], manifest["count"], manifest["factory"]) == ("text", 8, 40, "Flat")
    assert manifest["recall_vs_flat"] is None and manifest["params"] == {}
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
    assert isinstance(index.index, faiss.IndexFlat) and index.index.metric_type == faiss.METRIC_INNER_PRODUCT


@pytest.mark.parametrize("factory, faiss_type, params", [
    ("flat", faiss.IndexFlat, {}),
    ("IVF16,Flat", faiss.IndexIVFFlat, {"nprobe": 5}),
    ("ivf", faiss.IndexIVFFlat, {"nprobe": 5}),  # 4·sqrt(600) = 97 cells, capped at 600 // 39 = 15
    ("hnsw", faiss.IndexHNSWFlat, {"ef_construction": 40, "ef_search": 24}),
    ("IVF8,SQ8", faiss.IndexIVFScalarQuantizer, {"nprobe": 5}),
    ("IVF8_HNSW4,Flat", faiss.IndexIVFFlat, {"nprobe": 5, "ef_search": 24}),
])
def test_factory_strings_build_that_index_with_its_search_parameters(tmp_path, factory, faiss_type, params):
    docs = unit_rows(600, 16, clusters=8)
    settings = IndexSettings(factory=factory, nprobe=5, ef_search=24, ef_construction=40)
    built = build(tmp_path / "idx", docs, settings)
    expected_factory = {"flat": "Flat", "ivf": "IVF15,Flat", "hnsw": "HNSW32"}.get(factory, factory)
    assert built.manifest.factory == expected_factory and built.manifest.params == params
    assert (built.manifest.recall_vs_flat is None) == (factory == "flat")
    reloaded = load_index(tmp_path / "idx", ENC, "corpus-1")
    assert isinstance(reloaded.index, faiss_type) and reloaded.index.metric_type == faiss.METRIC_INNER_PRODUCT
    if "nprobe" in params:
        assert faiss.extract_index_ivf(reloaded.index).nprobe == 5
    if isinstance(reloaded.index, faiss.IndexHNSW):
        assert reloaded.index.hnsw.efSearch == 24 and reloaded.index.hnsw.efConstruction == 40
    assert np.array_equal(reloaded.search(docs[:5], 3)[1], built.search(docs[:5], 3)[1])


@pytest.mark.parametrize("factory, message", [
    ("hsnw", "not a shorthand; valid: ['flat', 'hnsw', 'ivf']"),
    ("IVF1x,Flat", "not valid for faiss.index_factory"),
    ("IVF64,Flat", "64 IVF cells for 50 vectors"),
    ("IDMap,Flat", "IDMap is not supported"),
    ("HNSW 32", "not an index factory string"),
])
def test_bad_index_settings_are_refused_and_nothing_is_published(tmp_path, factory, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(tmp_path / "idx", unit_rows(50, 8), IndexSettings(factory=factory))
    assert list(tmp_path.iterdir()) == []


def test_index_settings_come_from_yaml_as_is(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("retriever:\n  index: {factory: 'IVF16,Flat', nprobe: 4, recall_queries: 64}\n")
    assert load_config(path).retriever.index == IndexSettings(factory="IVF16,Flat", nprobe=4, recall_queries=64)
    assert load_config(None, {"retriever.index": "hnsw"}).retriever.index == IndexSettings(factory="hnsw")
    assert load_config(None).retriever.index == IndexSettings(factory="Flat")
    assert load_config(path, {"retriever.index.ef_search": 50}).retriever.index.ef_search == 50
    with pytest.raises(ConfigError, match=r"run.yaml: retriever.index: factory 'hsnw' is not a shorthand"):
        load_config(path, {"retriever.index.factory": "hsnw"})
    with pytest.raises(ConfigError, match=r"retriever.index: unknown key 'nprob'; valid keys: factory, nprobe"):
        load_config(path, {"retriever.index.nprob": 3})
    with pytest.raises(ConfigError, match=r"retriever.index: nprobe must be at least 1"):
        load_config(path, {"retriever.index.nprobe": 0})


def test_settings_import_without_torch_or_faiss():
    code = "import sys, dxrag.core.config; print(sorted({'torch', 'faiss'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_index_of_the_previous_manifest_format_still_loads(tmp_path):
    docs = unit_rows(600, 16, clusters=8)
    build(tmp_path / "idx", docs, IndexSettings(factory="IVF15,Flat", nprobe=3))
    manifest_path = tmp_path / "idx" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    del manifest["factory"]
    manifest.update(format="dxrag-index/1", kind="ivf", params={"nlist": 15, "nprobe": 3})
    manifest_path.write_text(json.dumps(manifest))
    loaded = load_index(tmp_path / "idx", ENC, "corpus-1")
    assert loaded.manifest.factory == "IVF15,Flat" and loaded.manifest.params == {"nprobe": 3}
    assert faiss.extract_index_ivf(loaded.index).nprobe == 3
