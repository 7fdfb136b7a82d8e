"""Run configuration: one YAML file mapped onto dataclasses, with dotted `--set` overrides and errors that name the
file, the key and the valid keys. Torch-free.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .data.synth import SynthConfig


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
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    image_weight: float = 1.0  # weight of the image<->image InfoNCE term (0: image<->text only)
    image_temperature: float = 0.2
    augment_noise: float = 0.3
    augment_shift: int = 1


@dataclass
class RetrieverSettings:
    encoder: str = "dxrag-tiny-clip"  # open_clip name, hf-hub:org/name or local-dir:/path
    pretrained: str | None = None  # open_clip pretrained tag or checkpoint, for built-in architectures
    pretrain: PretrainSettings | None = None  # contrastive stage on the corpus (the embedded default only)
    index: str = "flat"  # flat | ivf | hnsw
    batch_size: int = 256
    device: str = "cpu"  # encoder and query towers: cpu, cuda, cuda:1, auto (cuda when available)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Any = None  # None: the language model's linear layers


@dataclass
class ReaderFinetune:
    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    closed_book_fraction: float = 0.2
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory for large readers
    contexts_per_head: int = 2  # training prompts: each training query with its top-n items of each head (pipeline)
    eval_every: int = 200
    checkpoint_every: int = 100


@dataclass
class ReaderSettings:
    model: str = "tiny"  # tiny | a hub name | a local directory
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 64
    max_length: int | None = None
    max_pixels: int | None = None  # cap on each image's pixels in the reader's processor; None: the model's own
    lora: LoraConfig | None = None  # None: train every weight (the tiny reader starts from random weights)
    finetune: ReaderFinetune = field(default_factory=ReaderFinetune)
    tiny: dict[str, Any] = field(default_factory=dict)  # TinyReaderSettings overrides


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
    lr: float = 1e-4
    weight_decay: float = 0.01
    checkpoint_every: int = 50


@dataclass
class InferenceSettings:
    top_n: int = 2  # per head: 2 heads x 2 = 4 contexts per query
    split: str = "test"
    rank_order: list[str] = field(default_factory=lambda: ["image", "text"])  # interleaving of the heads' lists


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
    report: bool = True  # run the oracle analysis into reports/<run>/
    figures: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # a settings dataclass's own range checks (__post_init__)
        raise ConfigError(f"{where}: {e}") from None


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
    cfg = build(RunConfig, data, where)
    _check(cfg, where)
    return cfg


def _check(cfg: RunConfig, where: str) -> None:
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
    if cfg.retriever.index not in ("flat", "ivf", "hnsw"):
        raise ConfigError(f"{where}: retriever.index {cfg.retriever.index!r} is not one of ['flat', 'ivf', 'hnsw']")
    if not 0 <= cfg.reader.finetune.closed_book_fraction <= 1:
        raise ConfigError(f"{where}: reader.finetune.closed_book_fraction must lie in [0, 1]")
    if cfg.inference.split not in ("train", "val", "test"):
        raise ConfigError(f"{where}: inference.split must be train, val or test")
