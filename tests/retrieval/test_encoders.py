"""Encoders: the shipped tiny config builds offline, encodings are normalised, the safetensors `local-dir:` format
round-trips exactly, and the short contrastive stage learns class structure."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors import safe_open

from dxrag.core.base.dataset import DatasetError
from dxrag.core.retrieval.encoders import CONFIG_FILE, MODEL_CONFIG_DIR, TINY_MODEL, WEIGHTS_FILE, Encoder
from dxrag.core.retrieval.settings import PretrainSettings
from dxrag.core.training.contrastive import pretrain_contrastive


def test_tiny_config_ships_in_package_and_builds_offline(tiny_encoder):
    assert (MODEL_CONFIG_DIR / f"{TINY_MODEL}.json").is_file()
    assert TINY_MODEL in open_clip.list_models()
    assert tiny_encoder.dim == 64 and tiny_encoder.name == TINY_MODEL
    # the default BPE tokenizer reads its vocabulary from the installed package: no download
    assert isinstance(tiny_encoder.tokenizer, open_clip.tokenizer.SimpleTokenizer)
    assert Path(open_clip.tokenizer.default_bpe()).is_file()
    assert len(tiny_encoder.weights_hash) == 64


def test_encodings_are_l2_normalised_float32(tiny_encoder, make_pairs):
    images, texts, _ = make_pairs(2)
    img = tiny_encoder.encode_images(images, batch_size=3)
    txt = tiny_encoder.encode_texts(texts, batch_size=3)
    for emb in (img, txt):
        assert emb.dtype == np.float32 and emb.shape == (8, 64)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # batching does not change the result
    np.testing.assert_allclose(img, tiny_encoder.encode_images(images, batch_size=8), atol=1e-5)


def test_safetensors_local_dir_round_trip_is_exact(tiny_encoder, tmp_path, make_pairs):
    images, texts, _ = make_pairs(2)
    out = tiny_encoder.save(tmp_path / "enc")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as f:
        assert f.metadata()["model_name"] == TINY_MODEL
    assert json.loads((out / CONFIG_FILE).read_text())["model_cfg"]["embed_dim"] == 64

    loaded = Encoder.load_saved(out)
    assert loaded.name == TINY_MODEL and loaded.weights_hash == tiny_encoder.weights_hash
    assert np.array_equal(loaded.encode_images(images), tiny_encoder.encode_images(images))
    assert np.array_equal(loaded.encode_texts(texts), tiny_encoder.encode_texts(texts))
    # the directory is open_clip's own `local-dir:` format, loadable without dxrag
    raw = open_clip.create_model(f"local-dir:{out}").eval()
    pixels = tiny_encoder.preprocess_images(images)
    with torch.no_grad():
        torch.testing.assert_close(raw.encode_image(pixels), tiny_encoder.model.encode_image(pixels), rtol=0,
                                   atol=1e-6)


def test_local_dir_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        Encoder.load(f"local-dir:{tmp_path}")


def test_local_dir_with_replaced_weights_is_refused(tiny_encoder, tmp_path):
    out = tiny_encoder.save(tmp_path / "enc")
    torch.manual_seed(3)
    Encoder.load(TINY_MODEL).save(tmp_path / "other")
    (tmp_path / "other" / WEIGHTS_FILE).replace(out / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="weights_hash"):
        Encoder.load(f"local-dir:{out}")


def test_weights_hash_follows_the_weights():
    torch.manual_seed(1)
    a = Encoder.load(TINY_MODEL)
    torch.manual_seed(1)
    b = Encoder.load(TINY_MODEL)
    assert a.weights_hash == b.weights_hash
    with torch.no_grad():
        b.model.visual.proj[0, 0] += 1e-3
    b.freeze()
    assert a.weights_hash != b.weights_hash


def test_unreadable_image_is_an_error_naming_the_file(tiny_encoder, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        tiny_encoder.encode_images([bad])


def precision_at_5(queries: np.ndarray, docs: np.ndarray, q_labels: np.ndarray, d_labels: np.ndarray,
                   same_set: bool = False) -> float:
    scores = queries @ docs.T
    if same_set:
        np.fill_diagonal(scores, -np.inf)
    top = np.argsort(-scores, axis=1)[:, :5]
    return float((d_labels[top] == q_labels[:, None]).mean())


@pytest.fixture()
def one_thread():
    """Tiny models train faster on one thread, and much faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_contrastive_pretraining_learns_classes(make_pairs, one_thread):
    torch.manual_seed(0)
    encoder = Encoder.load(TINY_MODEL)
    images, texts, labels = make_pairs(24, seed=1)
    q_images, _, q_labels = make_pairs(10, seed=2)
    start = time.perf_counter()
    losses = pretrain_contrastive(encoder, images, texts, PretrainSettings(epochs=5, batch_size=48))
    elapsed = time.perf_counter() - start
    assert losses[-1] < losses[0]
    assert not any(p.requires_grad for p in encoder.model.parameters())
    q = encoder.encode_images(q_images)
    p_img = precision_at_5(q, encoder.encode_images(images), q_labels, labels)
    p_txt = precision_at_5(q, encoder.encode_texts(texts), q_labels, labels)
    print(f"toy contrastive stage: {elapsed:.1f}s, precision@5 image head {p_img:.2f}, text head {p_txt:.2f} "
          f"(chance 0.25)")
    assert p_img >= 0.6 and p_txt >= 0.6
