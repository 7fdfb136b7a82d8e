"""transformers CLIPModel / SiglipModel encoders (`hf:`): unit-norm embeddings equal to the model's own features, a
saved and reloaded encoder retrieves text by image through the index, the manifest refuses another encoder, and a
query tower over the HF image tower starts as the frozen retriever and trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dxrag.core.retrieval.settings import PretrainSettings
from dxrag.core.retrieval.encoders import TINY_MODEL, Encoder
from dxrag.core.training.contrastive import pretrain_contrastive
from dxrag.core.retrieval.heads import QueryTower
from dxrag.core.retrieval.hf_clip import MARKER_FILE, HFEncoder
from dxrag.core.retrieval.index import IndexMismatchError, load_index
from dxrag.core.retrieval.retriever import Retriever, build_retriever

CLIP_TYPES = ["clip", "siglip"]  # the model types of core/retrieval/hf_clip.py HF_CLIP_TYPES


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", CLIP_TYPES)
def test_embeddings_are_unit_norm_and_the_models_own_features(family, tiny_hf_dir, make_pairs):
    encoder = Encoder.load(f"hf:{tiny_hf_dir(family)}")
    assert isinstance(encoder, HFEncoder) and encoder.name == f"hf:{tiny_hf_dir(family)}"
    images, texts, _ = make_pairs(2)
    img = encoder.encode_images(images, batch_size=3)
    txt = encoder.encode_texts(texts, batch_size=3)
    for emb in (img, txt):
        assert emb.dtype == np.float32 and emb.shape == (8, encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    pixels = encoder.preprocess_images(images)
    assert pixels.shape == (8, 3, 32, 32)
    tokens = encoder.tokenizer(texts, padding="max_length" if family == "siglip" else True, return_tensors="pt")
    with torch.no_grad():
        own_img = F.normalize(encoder.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        own_txt = F.normalize(encoder.model.get_text_features(**tokens).pooler_output, dim=-1)
    np.testing.assert_allclose(img, own_img.numpy(), atol=1e-5)
    np.testing.assert_allclose(txt, own_txt.numpy(), atol=1e-5)
    # batching (and, for CLIP, padding to the batch's longest text) does not change the result
    np.testing.assert_allclose(txt, encoder.encode_texts(texts[::-1], batch_size=8)[::-1], atol=1e-5)
    assert not np.allclose(img[0], img[1], atol=1e-3) and not np.allclose(txt[0], txt[1], atol=1e-3)


@pytest.fixture(scope="module", params=CLIP_TYPES)
def trained(request, tiny_hf_dir, make_pairs, toy_dataset, tmp_path_factory):
    """family, a contrastively trained tiny HF encoder saved and reloaded, and the retriever it built."""
    encoder = Encoder.load(f"hf:{tiny_hf_dir(request.param)}")
    images, texts, _ = make_pairs(24, seed=1)
    losses = pretrain_contrastive(encoder, images, texts, PretrainSettings(epochs=5, batch_size=48))
    assert losses[-1] < losses[0]
    out = tmp_path_factory.mktemp(f"trained-{request.param}")
    reloaded = Encoder.load_saved(encoder.save(out / "encoder"))
    assert (reloaded.name, reloaded.weights_hash) == (encoder.name, encoder.weights_hash)
    assert np.array_equal(reloaded.encode_texts(texts), encoder.encode_texts(texts))
    assert np.array_equal(reloaded.encode_images(images), encoder.encode_images(images))
    retriever = build_retriever(toy_dataset, reloaded, out / "index")
    return request.param, reloaded, retriever, out


def test_saved_encoder_retrieves_text_and_images_of_the_query_class(trained, toy_dataset):
    family, encoder, retriever, _ = trained
    queries = toy_dataset.queries["val"]
    hits = retriever.retrieve([toy_dataset.image_path(q.image) for q in queries], k=5)
    label_of = {item.id: item.label for item in toy_dataset.corpus}
    precision = {head: np.mean([[label_of[i] == q.label for i, _ in row] for q, row in zip(queries, rows)])
                 for head, rows in hits.items()}
    print(f"hf {family}: precision@5 over {len(queries)} queries {precision} (chance 0.25)")
    assert precision["text"] >= 0.6 and precision["image"] >= 0.6
    manifest = retriever.indexes["text"].manifest
    assert (manifest.encoder_name, manifest.encoder_weights_hash, manifest.dim) == \
        (encoder.name, encoder.weights_hash, encoder.dim)


def test_index_of_an_hf_encoder_refuses_another_encoder(trained, tiny_hf_dir, tiny_encoder, toy_dataset):
    family, encoder, _, out = trained
    assert len(Retriever.load(out / "index", encoder, toy_dataset.corpus_checksum).indexes["text"]) == 48
    untrained = Encoder.load(f"hf:{tiny_hf_dir(family)}")  # same architecture and name, other weights
    for other in (untrained, tiny_encoder):
        with pytest.raises(IndexMismatchError, match=other.weights_hash):
            load_index(out / "index" / "text", other)


@pytest.mark.parametrize("family", CLIP_TYPES)
def test_query_tower_over_hf_encoder_starts_frozen_and_trains(family, tiny_hf_dir, make_pairs, tmp_path):
    encoder = Encoder.load(f"hf:{tiny_hf_dir(family)}")
    images, _, _ = make_pairs(2)
    pixels = encoder.preprocess_images(images)
    frozen = encoder.encode_image_tensor(pixels)
    tower = QueryTower(encoder, "text", alpha=0.5)
    np.testing.assert_allclose(tower.embed(pixels), frozen, atol=1e-6)
    hash_before = encoder.weights_hash
    tower.train()
    optimizer = torch.optim.SGD(tower.trainable_parameters(), lr=1.0)
    q = tower(pixels)
    (q[:, 0] - q[:, 1]).sum().backward()
    trainable = list(tower.trainable_parameters())
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in encoder.model.parameters())
    optimizer.step()
    encoder.freeze()  # recompute the hash from the weights
    assert encoder.weights_hash == hash_before
    assert not np.allclose(tower.embed(pixels), frozen, atol=1e-4)
    restored = QueryTower(encoder, "text").load(tower.save(tmp_path / "text_head.safetensors"))
    assert np.array_equal(restored.embed(pixels), tower.embed(pixels))


def test_bad_hf_names_and_directories_are_refused(tiny_hf_dir, tmp_path):
    from transformers import BertConfig

    with pytest.raises(FileNotFoundError, match="not found"):
        Encoder.load(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="applies to open_clip built-in"):
        Encoder.load(f"hf:{tiny_hf_dir('clip')}", pretrained="openai")
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"model type 'bert' is not supported; valid: \['clip', 'siglip'\]"):
        Encoder.load(f"hf:{tmp_path / 'bert'}")
    with pytest.raises(FileNotFoundError, match="loads as 'hf:"):
        Encoder.load(f"local-dir:{tiny_hf_dir('clip')}")
    with pytest.raises(FileNotFoundError, match="not an encoder directory"):
        Encoder.load_saved(tmp_path / "bert")


def test_saved_hf_encoder_with_replaced_weights_is_refused(tiny_hf_dir, tmp_path):
    encoder = Encoder.load(f"hf:{tiny_hf_dir('siglip')}")
    out = encoder.save(tmp_path / "enc")
    assert json.loads((out / MARKER_FILE).read_text())["weights_hash"] == encoder.weights_hash
    with torch.no_grad():
        encoder.model.logit_bias.add_(1.0)
    encoder.freeze()
    encoder.save(tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").replace(out / "model.safetensors")
    with pytest.raises(ValueError, match="weights_hash"):
        Encoder.load_saved(out)


def test_open_clip_and_hf_encoders_share_one_contract(tiny_encoder, tiny_hf_dir):
    hf = Encoder.load(f"hf:{tiny_hf_dir('clip')}")
    for encoder in (tiny_encoder, hf):
        assert isinstance(encoder, Encoder) and isinstance(encoder.visual, torch.nn.Module)
        assert encoder.logit_scale.numel() == 1 and len(encoder.weights_hash) == 64
    assert tiny_encoder.name == TINY_MODEL
