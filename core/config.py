"""Run configuration: one YAML file mapped onto dataclasses, with dotted `--set` overrides and errors that name the
file, the key and the valid keys. Torch-free.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .base.fusion import FusionSettings
from .data.synth import SynthConfig
from .probe import ProbeSettings
from .reader.settings import ReaderSettings

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """Invalid configuration; the message names the file and the key at fault and what would be valid."""


@dataclass
class DataConfig:
    kind: str = "synth"  # synth | medmnist (both built into <run dir>/data) | dir (an existing dataset directory)
    path: str | None = None  # dataset directory for kind=dir
    seed: int = 0
    synth: SynthConfig = field(default_factory=SynthConfig)  # kind=synth: the generator's knobs
    flag: str | None = None  # kind=medmnist: the MedMNIST flag, e.g. breastmnist
    npz: str | None = None  # kind=medmnist: local npz file (None: the medmnist package downloads it when online)


@dataclass
class PretrainSettings:
    """The contrastive stage on the corpus's image-text pairs (`encoders.pretrain_contrastive`): for the tiny
    encoder it stands in for a general-purpose pretrained backbone; over real pretrained towers that are not
    image-text aligned (dxrag-effnet-minilm) it trains their projections LiT-style (`lock_towers`; locked towers are
    run once, so an epoch costs the projections only). Image <-> text InfoNCE, plus (`image_weight` > 0) an image
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


@dataclass
class DistillSettings:
    heads: list[str] = field(default_factory=lambda: ["text", "image"])  # trained in this order
    steps: int = 150  # per head
    batch_size: int = 32
    candidates: int = 20  # K
    refresh_every: int = 10  # R: steps between snapshot refreshes of the candidate retriever
    alpha: float = 0.15
    tau_gold: float = 0.1
    tau_retriever: float = 0.1
    prior_tilt: float = 0.0  # > 0 adds prior_tilt * retriever log-prior to the gold logits (the reference's variant)
    # per-query KL weight from whether the reader's predictions over the query's K candidates disagree (the
    # reference's weighting_kl): none (every query 1), only (consistent queries 0, inconsistent 1), upweight
    # (consistent 1, inconsistent inconsistency_factor); the loss is the weighted mean over the batch
    inconsistency_weighting: str = "none"
    inconsistency_factor: float = 2.0  # upweight: an inconsistent query's weight relative to a consistent one's
    lr: float = 1e-4
    weight_decay: float = 0.01
    checkpoint_every: int = 50


@dataclass
class InferenceSettings:
    top_n: int = 2  # per head: 2 heads x 2 = 4 contexts per query
    # validation predictions (what the learned context selector trains on) for at most this many validation
    # queries, a sample fixed by the run's seed; null: every validation query
    val_queries: int | None = None
    split: str = "test"
    rank_order: list[str] = field(default_factory=lambda: ["image", "text"])  # interleaving of the heads' lists
    fusion: FusionSettings = field(default_factory=FusionSettings)  # how the contexts' answers become one answer


@dataclass
class RunConfig:
    run: str = "embedded"
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 keeps torch's default. Tiny models run fastest on 1 thread.
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverSettings = field(default_factory=RetrieverSettings)
    reader: ReaderSettings = field(default_factory=ReaderSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    probe: ProbeSettings = field(default_factory=ProbeSettings)  # the `probe` baseline system (core/probe.py)
    report: bool = True  # run the oracle analysis into reports/<run>/
    figures: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# settings added after runs were recorded (section path: {key: the value that describes what those runs did})
ADDED_KEYS = {("reader", "finetune"): {"loss": "answer", "balanced_sampling": False},
              ("inference",): {"val_queries": None}}


def recorded_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config as a run recorded it (run.json, a sweep's ranges.json), in today's keys: runs recorded before
    `inference.fusion` existed fused their contexts with `distill.tau_retriever`, which is what it then means; runs
    recorded before a setting of `ADDED_KEYS` existed ran as its default does."""
    for path, added in ADDED_KEYS.items():
        config = _with_defaults(config, path, added)
    inference = config.get("inference", {})
    if "fusion" in inference or "tau_retriever" not in config.get("distill", {}):
        return config
    fusion = {"temperature": config["distill"]["tau_retriever"]}
    return {**config, "inference": {**inference, "fusion": fusion}}


def _with_defaults(config: dict[str, Any], path: tuple[str, ...], added: dict[str, Any]) -> dict[str, Any]:
    """`config` with the keys of `added` that the section at `path` lacks filled in (a copy; unchanged if none)."""
    section = config.get(path[0])
    if not isinstance(section, dict):
        return config
    if len(path) > 1:
        inner = _with_defaults(section, path[1:], added)
        return config if inner is section else {**config, path[0]: inner}
    return config if set(added) <= set(section) else {**config, path[0]: {**added, **section}}


def _key(where: str, key: str) -> str:
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r:.60}")
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r:.60}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r:.60}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r:.60}")


def build(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{where.rstrip(':')}: unknown key {unknown[0]!r}; valid keys: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], _key(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # a settings dataclass's own range checks (__post_init__)
        raise ConfigError(f"{where.rstrip(':')}: {e}") from None


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when `path` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (see configs/ for examples)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at top level")
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    if isinstance(data.get("distill"), dict) and "tau_retriever" in data["distill"] and not (
            isinstance(data.get("inference"), dict) and "fusion" in data["inference"]):
        log.warning("%s: distill.tau_retriever no longer sets the fusion temperature; inference.fusion.temperature "
                    "does (default %s): set it to keep fusing as before", where, FusionSettings().temperature)
    cfg = build(RunConfig, data, f"{where}:")
    _check(cfg, where)
    return cfg


# Counts with a least valid value (dotted key: minimum): a batch of 0, a negative step count or no contexts would
# fail deep inside a stage, or silently train nothing.
AT_LEAST = {
    "threads": 0,
    "retriever.batch_size": 1, "retriever.pretrain.epochs": 0, "retriever.pretrain.batch_size": 1,
    "reader.batch_size": 1, "reader.image_cache": 0, "reader.finetune.steps": 0, "reader.finetune.batch_size": 1,
    "reader.finetune.contexts_per_head": 1, "reader.finetune.eval_every": 0, "reader.finetune.checkpoint_every": 0,
    "distill.steps": 0, "distill.batch_size": 1, "distill.candidates": 1, "distill.refresh_every": 1,
    "distill.checkpoint_every": 1,
    "inference.top_n": 1, "inference.val_queries": 1,
}


def _dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        if obj is None:
            return None
        obj = getattr(obj, part)
    return obj


def _check(cfg: RunConfig, where: str) -> None:
    for key, least in AT_LEAST.items():
        value = _dotted(cfg, key)
        if value is not None and value < least:
            raise ConfigError(f"{where}: {key} must be at least {least}, got {value}")
    if cfg.data.kind not in ("synth", "medmnist", "dir"):
        raise ConfigError(f"{where}: data.kind {cfg.data.kind!r} is not one of ['synth', 'medmnist', 'dir']")
    if cfg.data.kind == "medmnist" and not cfg.data.flag:
        raise ConfigError(f"{where}: data.flag is required when data.kind is 'medmnist' (e.g. breastmnist)")
    if cfg.data.kind == "dir" and not cfg.data.path:
        raise ConfigError(f"{where}: data.path is required when data.kind is 'dir'")
    bad = [h for h in cfg.distill.heads if h not in ("image", "text")]
    if bad:
        raise ConfigError(f"{where}: distill.heads: {bad} not in ['image', 'text']")
    if sorted(cfg.inference.rank_order) != ["image", "text"]:
        raise ConfigError(f"{where}: inference.rank_order must list 'image' and 'text' once each")
    if cfg.distill.inconsistency_weighting not in ("none", "only", "upweight"):
        raise ConfigError(f"{where}: distill.inconsistency_weighting {cfg.distill.inconsistency_weighting!r} is not "
                          f"one of ['none', 'only', 'upweight']")
    if cfg.distill.inconsistency_factor <= 0:
        raise ConfigError(f"{where}: distill.inconsistency_factor must be > 0, got {cfg.distill.inconsistency_factor}")
    try:
        cfg.retriever.index.validate()
    except ValueError as e:
        raise ConfigError(f"{where}: retriever.index: {e}") from None
    try:
        cfg.reader.check()
        cfg.probe.check()
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if cfg.inference.split not in ("train", "val", "test"):
        raise ConfigError(f"{where}: inference.split must be train, val or test")
