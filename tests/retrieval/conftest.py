"""Shared fixtures for the retrieval tests: a random-weight tiny encoder, a toy class-coloured image/text set, and a
small dataset directory in the on-disk format."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from dxrag.core.base.dataset import DatasetMeta, DatasetWriter, load_dataset
from dxrag.core.base.records import CorpusItem, Query

CLASSES = ("red", "green", "blue", "yellow")
_COLOURS = np.array([[190, 60, 60], [60, 190, 60], [60, 60, 190], [190, 190, 60]], dtype=np.float64)


def toy_pairs(n_per_class: int, seed: int = 0) -> tuple[list[Image.Image], list[str], np.ndarray]:
    """32×32 images whose colour and stripe orientation depend on the class, and texts that name the class."""
    rng = np.random.default_rng(seed)
    images, texts, labels = [], [], []
    yy, xx = np.mgrid[0:32, 0:32]
    for i in range(n_per_class * len(CLASSES)):
        c = i % len(CLASSES)
        stripes = ((xx if c % 2 else yy) // 4 % 2)[..., None] * 40.0
        pixels = _COLOURS[c] + stripes + rng.normal(0, 35, (32, 32, 3))
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
        texts.append(f"report {i}: the finding is {CLASSES[c]} class {c}, size {rng.integers(1, 9)} mm.")
        labels.append(c)
    return images, texts, np.asarray(labels)


@pytest.fixture(scope="session")
def make_pairs():
    """The `toy_pairs` generator (test modules cannot import conftest under --import-mode=importlib)."""
    return toy_pairs


@pytest.fixture(scope="session")
def tiny_encoder():
    from dxrag.core.retrieval.encoders import TINY_MODEL, Encoder

    torch.manual_seed(0)
    return Encoder.load(TINY_MODEL)


def write_toy_dataset(out, n_per_class: int = 12, seed: int = 0, text_suffix: str = ""):
    images, texts, labels = toy_pairs(n_per_class, seed)
    q_images, _, q_labels = toy_pairs(2, seed + 100)
    with DatasetWriter(out) as w:
        for i, (im, text, lab) in enumerate(zip(images, texts, labels)):
            w.corpus.append(CorpusItem(id=f"c{i:04d}", image=w.add_image(f"c{i:04d}", im), text=text + text_suffix,
                                       label=CLASSES[lab]))
        for i, (im, lab) in enumerate(zip(q_images, q_labels)):
            w.queries["val"].append(Query(id=f"q{i:03d}", image=w.add_image(f"q{i:03d}", im),
                                          question="Which colour?", candidates=CLASSES, label=CLASSES[lab]))
        w.meta = DatasetMeta(name="toy", task="classification", labels=list(CLASSES))
    return load_dataset(out)


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("data") / "toy")


def save_tiny_hf_dual_encoder(out, family: str, texts, seed: int = 0):
    """A random-weight transformers CLIPModel ("clip") or SiglipModel ("siglip") saved with save_pretrained: hidden
    32, 2 layers, 32-px images in 8-px patches, and an offline word-level tokenizer over the words of `texts`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast, SiglipConfig,
                              SiglipImageProcessor, SiglipModel)

    splitter = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in splitter.pre_tokenize_str(text)})
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]  # eos id 3: CLIP pools at the first eos (id 2 means legacy argmax)
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    single = "<bos> $A <eos>" if family == "clip" else "$A <eos>"
    backend.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, vocab[t]) for t in ("<bos>", "<eos>") if t in single])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<bos>", eos_token="<eos>", model_max_length=24)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(tower, vocab_size=len(vocab), max_position_embeddings=24, pad_token_id=0, bos_token_id=2,
                eos_token_id=3)
    vision = dict(tower, image_size=32, patch_size=8)
    torch.manual_seed(seed)
    if family == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
        images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        images = SiglipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(out)
    images.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf_builder():
    """The `save_tiny_hf_dual_encoder` builder (test modules cannot import conftest under --import-mode=importlib)."""
    return save_tiny_hf_dual_encoder


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """family -> a saved tiny random-weight model directory (built once per session) for `hf:` names; its vocabulary
    covers the toy texts of seeds 0-2."""
    built = {}

    def get(family: str):
        if family not in built:
            texts = [t for seed in range(3) for t in toy_pairs(24, seed)[1]]
            built[family] = save_tiny_hf_dual_encoder(tmp_path_factory.mktemp(f"hf-{family}"), family, texts)
        return built[family]

    return get
