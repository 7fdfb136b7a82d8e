"""The retrieval component's settings (`retriever` of the run config): the encoder (`RetrieverSettings`), its
contrastive stage (`PretrainSettings`, run by core/training/contrastive.py) and each head's FAISS index
(`IndexSettings`, core/retrieval/index.py). Torch-free, so the config mapper (core/config.py) builds them without
torch or faiss.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PretrainSettings:
    """The contrastive stage on the corpus's image-text pairs (`pretrain_contrastive`, core/training/contrastive.py):
    for the tiny encoder it stands in for a general-purpose pretrained backbone; over real pretrained towers that are
    not image-text aligned (dxrag-effnet-minilm) it trains their projections LiT-style (`lock_towers`; locked towers
    are run once, so an epoch costs the projections only). Image <-> text InfoNCE, plus (`image_weight` > 0) an image
    <-> image InfoNCE between two augmented views of each image (random shift of up to `augment_shift` pixels,
    Gaussian noise of std `augment_noise` in normalised units). Without the image term the image embeddings of a
    corpus of similar-looking images collapse into a narrow cone (cosine about 0.99 between all images of the
    embedded default), which leaves the image head a few thousandths of cosine to rank by. The random seed is the
    run's."""

    epochs: int = 10  # on the synthetic corpus the loss sits near log(batch) for a few epochs before it falls
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    image_weight: float = 1.0  # weight of the image<->image InfoNCE term (0: image<->text only)
    image_temperature: float = 0.2
    augment_noise: float = 0.3
    augment_shift: int = 1
    # LiT: pretrained towers stay locked (eval mode) and only the projections and logit_scale train, except the last
    # `unlocked_image_groups` layer groups of a timm image tower and `unlocked_text_layers` of an HF text tower
    lock_towers: bool = False
    unlocked_image_groups: int = 0
    unlocked_text_layers: int = 0


INDEX_SHORTHANDS = {"flat": "Flat", "ivf": "IVF{nlist},Flat", "hnsw": "HNSW32"}  # {nlist}: 4·sqrt(n) at build time


@dataclass
class IndexSettings:
    """Which FAISS index each head gets, as a `faiss.index_factory` string over inner product: "Flat" (exact),
    "IVF256,Flat", "HNSW32", "IVF1024,PQ16", ... or a shorthand: flat, hnsw (HNSW32), ivf (IVF with 4·sqrt(n) cells,
    at most n/39). Search parameters apply where the index has them (nprobe: IVF; ef_search, ef_construction: HNSW).
    For approximate indexes recall@`recall_k` against exact search is measured at build time on up to
    `recall_queries` query images and written to the manifest."""

    factory: str = "Flat"
    nprobe: int = 16  # IVF cells visited per query (at most the number of cells)
    ef_search: int = 128  # HNSW candidate list length at search time
    ef_construction: int = 80  # HNSW candidate list length while adding
    recall_k: int = 10
    recall_queries: int = 256

    def validate(self) -> None:
        """Raise ValueError naming the field at fault. The factory string's grammar is checked by faiss at build
        time; here a lower-case word must be a shorthand (faiss's own components are capitalised)."""
        factory = self.factory.strip()
        if not factory or any(c.isspace() for c in factory):
            raise ValueError(f"factory {self.factory!r} is not an index factory string; valid: a shorthand "
                             f"{sorted(INDEX_SHORTHANDS)} or a faiss.index_factory string such as 'Flat', "
                             f"'IVF256,Flat', 'HNSW32'")
        if factory.isalpha() and factory.islower() and factory not in INDEX_SHORTHANDS:
            raise ValueError(f"factory {self.factory!r} is not a shorthand; valid: {sorted(INDEX_SHORTHANDS)} or a "
                             f"faiss.index_factory string such as 'Flat', 'IVF256,Flat', 'HNSW32'")
        if "IDMap" in factory:
            raise ValueError(f"factory {self.factory!r}: IDMap is not supported (dxrag maps rows to item ids itself)")
        for name in ("nprobe", "ef_search", "ef_construction", "recall_k", "recall_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class RetrieverSettings:
    # open_clip: a built-in name, hf-hub:org/name or local-dir:/path; transformers CLIPModel / SiglipModel:
    # hf:org/name or hf:/path (a directory written by save_pretrained)
    encoder: str = "dxrag-tiny-clip"
    pretrained: str | None = None  # open_clip pretrained tag or checkpoint, for built-in architectures
    pretrain: PretrainSettings | None = None  # contrastive stage on the corpus (the embedded default only)
    index: IndexSettings | str = field(default_factory=IndexSettings)  # a bare string is IndexSettings(factory=...)
    batch_size: int = 256
    device: str = "cpu"  # encoder and query towers: cpu, cuda, cuda:1, auto (cuda when available)

    def __post_init__(self) -> None:
        if isinstance(self.index, str):
            self.index = IndexSettings(factory=self.index)
