"""The pretrained retriever `dxrag-effnet-minilm` (EfficientNet-Lite0 + MiniLM from the weights cache): the towers'
weights really load, LiT training moves only the projections, a saved encoder is portable and reloads exactly, the
embedding of an image is the same in another process, and the query heads train over it. Marked `real`: they need
`make weights` (skipped otherwise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dxrag.core.retrieval.settings import PretrainSettings
from dxrag.core.retrieval.encoders import CONFIG_FILE, PRETRAINED_MODEL, Encoder
from dxrag.core.training.contrastive import pretrain_contrastive
from dxrag_test_support import real_weights

pytestmark = pytest.mark.real

NAMES = ["astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "horse", "hubble_deep_field",
         "immunohistochemistry", "retina", "brick", "grass", "gravel", "text", "clock", "checkerboard", "logo",
         "colorwheel", "microaneurysms", "cell"]  # the images skimage ships (no download)
CAPTIONS = {"astronaut": "an astronaut in a space suit", "camera": "a cameraman behind a tripod",
            "coffee": "a cup of coffee on a saucer", "chelsea": "a tabby cat looking sideways",
            "rocket": "a rocket on the launch pad", "coins": "old coins on a tray"}


@pytest.fixture(scope="module")
def weights_present():
    real_weights("efficientnet-lite0")
    real_weights("minilm-l6-v2")


def _skimage(names=NAMES) -> list[Image.Image]:
    from skimage import data

    out = []
    for name in names:
        arr = np.asarray(getattr(data, name)())
        if arr.ndim == 2 or arr.dtype == bool:
            arr = (arr.astype(np.float32) / max(1, arr.max()) * 255).astype(np.uint8) if arr.dtype != np.uint8 else arr
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., :3]
        out.append(Image.fromarray(arr).convert("RGB"))
    return out


def _view(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (70-90 % of each side), a horizontal flip half the time, and a brightness change."""
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.7, 0.9)), int(h * rng.uniform(0.7, 0.9))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.clip(np.asarray(out, dtype=np.float32) * rng.uniform(0.75, 1.25), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _top1_view_retrieval(encoder: Encoder, images: list[Image.Image]) -> float:
    rng = np.random.default_rng(0)
    a = encoder.encode_images([_view(im, rng) for im in images])
    b = encoder.encode_images([_view(im, rng) for im in images])
    return float(np.mean((a @ b.T).argmax(axis=1) == np.arange(len(images))))


def test_pretrained_image_tower_beats_random_init_at_view_retrieval(weights_present):
    """Would fail if the EfficientNet weights silently did not load: a random-init tower matches views of the same
    image far less often."""
    import timm

    images = _skimage()
    pretrained = Encoder.load(PRETRAINED_MODEL)
    random_init = Encoder.load(PRETRAINED_MODEL)
    torch.manual_seed(0)
    random_init.model.visual.trunk.load_state_dict(
        timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).state_dict())
    acc_pre, acc_rand = _top1_view_retrieval(pretrained, images), _top1_view_retrieval(random_init, images)
    assert acc_pre >= 0.8, (acc_pre, acc_rand)
    assert acc_pre >= acc_rand + 0.25, (acc_pre, acc_rand)


def test_text_tower_is_minilm(weights_present):
    """The HF tower is MiniLM with its weights: mean-pooled hidden states rank a paraphrase above an unrelated text
    (a random-init BERT would not)."""
    enc = Encoder.load(PRETRAINED_MODEL)
    _, _, text_body, _ = enc.tower_split()
    with torch.no_grad():
        feats = torch.nn.functional.normalize(text_body(enc.tokenize(
            ["pleural effusion on chest radiograph", "fluid in the pleural space on a chest x-ray",
             "a photo of a cat on a sofa"])), dim=-1)
    para, unrelated = float(feats[0] @ feats[1]), float(feats[0] @ feats[2])
    assert para > 0.5 and para > unrelated + 0.3, (para, unrelated)


def test_lit_trains_projections_only_and_aligns_the_towers(weights_present, tmp_path):
    names = list(CAPTIONS)
    images, texts = _skimage(names), [CAPTIONS[n] for n in names]
    enc = Encoder.load(PRETRAINED_MODEL)
    trunk0 = {k: v.clone() for k, v in enc.model.visual.trunk.state_dict().items()}
    text0 = {k: v.clone() for k, v in enc.model.text.transformer.state_dict().items()}
    proj0 = enc.model.visual.head.proj.weight.clone()
    settings = PretrainSettings(epochs=60, batch_size=len(names), lr=5e-3, lock_towers=True)
    losses = pretrain_contrastive(enc, images, texts, settings, seed=0)
    assert losses[-1] < losses[0] / 2
    trunk1, text1 = enc.model.visual.trunk.state_dict(), enc.model.text.transformer.state_dict()
    assert all(torch.equal(v, trunk1[k]) for k, v in trunk0.items())  # BN statistics included
    assert all(torch.equal(v, text1[k]) for k, v in text0.items())
    assert not torch.equal(proj0, enc.model.visual.head.proj.weight)
    sims = enc.encode_images(images) @ enc.encode_texts(texts).T
    assert np.mean(sims.argmax(axis=1) == np.arange(len(names))) == 1.0


def test_save_is_portable_and_reloads_the_same_embeddings(weights_present, tmp_path):
    from dxrag.core import weights

    enc = Encoder.load(PRETRAINED_MODEL)
    images = _skimage(NAMES[:4])
    out = enc.save(tmp_path / "enc")
    config_text = (out / CONFIG_FILE).read_text()
    assert str(weights.home()) not in config_text and "dxrag-weights:minilm-l6-v2" in config_text
    again = Encoder.load_saved(out)
    assert again.name == PRETRAINED_MODEL and again.weights_hash == enc.weights_hash
    np.testing.assert_array_equal(again.encode_images(images), enc.encode_images(images))
    np.testing.assert_array_equal(again.encode_texts(["benign lesion"]), enc.encode_texts(["benign lesion"]))


ENCODE_SCRIPT = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from PIL import Image
from dxrag.core.retrieval.encoders import Encoder
enc = Encoder.load_saved(sys.argv[1])
emb = enc.encode_images([Image.open(sys.argv[2])])
sys.stdout.write(emb.tobytes().hex())
"""


def test_same_image_same_embedding_across_processes(weights_present, tmp_path):
    enc = Encoder.load(PRETRAINED_MODEL)
    saved = enc.save(tmp_path / "enc")
    image = tmp_path / "coffee.png"
    _skimage(["coffee"])[0].save(image)
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    import os

    outs = [subprocess.run([sys.executable, "-c", ENCODE_SCRIPT, str(saved), str(image)], capture_output=True,
                           text=True, check=True, env={**os.environ, **env}).stdout for _ in range(2)]
    assert outs[0] == outs[1] and len(outs[0]) == 2 * 4 * enc.dim
    torch.set_num_threads(1)
    here = Encoder.load_saved(saved).encode_images([Image.open(image)])
    np.testing.assert_array_equal(np.frombuffer(bytes.fromhex(outs[0]), dtype=np.float32).reshape(1, -1), here)


def test_missing_weights_name_what_to_run(tmp_path, monkeypatch):
    from dxrag.core.weights import WeightsError

    monkeypatch.setenv("DXRAG_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsError, match="dxrag weights install"):
        Encoder.load(PRETRAINED_MODEL)


def test_query_heads_train_over_it(weights_present):
    """A query tower is a trainable copy of the EfficientNet tower: gradients reach it, the frozen tower and the
    encoder stay as they were, and its save/load round-trips."""
    from dxrag.core.retrieval.heads import QueryTower

    enc = Encoder.load(PRETRAINED_MODEL)
    h0 = enc.weights_hash
    tower = QueryTower.from_encoder(enc, "image")
    pixels = enc.preprocess_images(_skimage(NAMES[:8]))
    before = tower.embed(pixels)
    np.testing.assert_allclose(before, enc.encode_image_tensor(pixels), atol=1e-5)  # f_θ == f_0 at start
    opt = torch.optim.AdamW(tower.trainable_parameters(), lr=1e-3)
    tower.train()
    for _ in range(3):
        loss = -(tower(pixels) @ tower(pixels.flip(-1)).T).diag().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not np.allclose(tower.embed(pixels), before)
    assert enc.weights_hash == h0


@pytest.mark.slow
def test_pipeline_runs_over_the_pretrained_retriever(weights_present, tmp_path):
    """The small embedded run with `retriever.encoder: dxrag-effnet-minilm` (LiT stage, both query heads distilled):
    it finishes, its saved encoder holds no cache path and reloads to the recorded weights."""
    from dxrag.core import weights
    from dxrag.core.config import load_config
    from dxrag.core.pipeline import run_pipeline
    from dxrag_test_support import SMALL

    repo = Path(__file__).resolve().parents[2]
    overrides = {**SMALL, "run": "small-pretrained", "retriever.encoder": PRETRAINED_MODEL,
                 "retriever.pretrain": {"epochs": 3, "batch_size": 64, "lr": 1e-3, "lock_towers": True}}
    summary = run_pipeline(load_config(repo / "configs" / "embedded.yaml", overrides), tmp_path / "trained",
                           tmp_path / "reports")
    assert {"rag", "joint"} <= set(summary["metrics"])
    saved = Path(summary["run_dir"]) / "encoder"
    assert str(weights.home()) not in (saved / CONFIG_FILE).read_text()
    record = json.loads((saved / CONFIG_FILE).read_text())
    assert Encoder.load_saved(saved).weights_hash == record["weights_hash"]
