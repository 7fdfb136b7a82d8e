"""Query towers: at initialisation they reproduce the frozen retriever, gradients reach the trainable copy only,
the two heads do not share weights, and the trainable part round-trips through safetensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dxrag.core.retrieval.encoders import TINY_MODEL, Encoder
from dxrag.core.retrieval.heads import HEADS, QueryTower, preprocess_queries, query_towers


@pytest.fixture()
def pixels(tiny_encoder, make_pairs):
    images, _, _ = make_pairs(3)
    return preprocess_queries(tiny_encoder, images)


def test_untrained_tower_equals_frozen_image_embedding(tiny_encoder, pixels):
    tower = QueryTower(tiny_encoder, "text")
    frozen = tiny_encoder.encode_image_tensor(pixels)
    np.testing.assert_allclose(tower.embed(pixels), frozen, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(tower(pixels).numpy(), frozen, atol=1e-6)


def test_only_the_trainable_copy_gets_gradients(tiny_encoder, pixels):
    tower = QueryTower(tiny_encoder, "image", alpha=0.5)
    frozen_before = {k: v.clone() for k, v in tiny_encoder.model.state_dict().items()}
    hash_before = tiny_encoder.weights_hash
    tower.train()
    assert not tower.frozen.training
    optimizer = torch.optim.SGD(tower.trainable_parameters(), lr=1.0)
    q = tower(pixels)
    assert q.requires_grad
    np.testing.assert_allclose(q.norm(dim=1).detach().numpy(), 1.0, atol=1e-5)
    (q[:, 0] - q[:, 1]).sum().backward()
    assert all(p.grad is not None for p in tower.trainable.parameters())
    assert all(p.grad is None for p in tower.frozen.parameters())
    optimizer.step()
    after = tiny_encoder.model.state_dict()
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before)
    assert tiny_encoder.weights_hash == hash_before
    assert not np.allclose(tower.embed(pixels), tiny_encoder.encode_image_tensor(pixels), atol=1e-4)


def test_heads_have_separate_trainable_copies(tiny_encoder):
    towers = query_towers(tiny_encoder)
    assert set(towers) == set(HEADS)
    a = {p.data_ptr() for p in towers["image"].trainable_parameters()}
    b = {p.data_ptr() for p in towers["text"].trainable_parameters()}
    frozen = {p.data_ptr() for p in tiny_encoder.visual.parameters()}
    assert not (a & b) and not (a & frozen) and not (b & frozen)


def test_trainable_part_round_trips_through_safetensors(tiny_encoder, pixels, tmp_path):
    tower = QueryTower(tiny_encoder, "text", alpha=0.3)
    with torch.no_grad():
        for p in tower.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tower.save(tmp_path / "text_head.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(tower.trainable.state_dict())
        assert f.metadata()["head"] == "text" and float(f.metadata()["alpha"]) == 0.3
    restored = QueryTower(tiny_encoder, "text").load(path)
    assert restored.alpha == 0.3
    assert np.array_equal(restored.embed(pixels), tower.embed(pixels))
    with pytest.raises(ValueError, match="'head'"):
        QueryTower(tiny_encoder, "image").load(path)
    torch.manual_seed(7)
    other = Encoder.load(TINY_MODEL)
    with pytest.raises(ValueError, match=tiny_encoder.weights_hash):
        QueryTower(other, "text").load(path)


def test_bad_head_or_alpha_is_refused(tiny_encoder):
    with pytest.raises(ValueError, match="not one of"):
        QueryTower(tiny_encoder, "audio")
    with pytest.raises(ValueError, match="alpha"):
        QueryTower(tiny_encoder, "image", alpha=1.5)
