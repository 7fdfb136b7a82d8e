"""Run configuration: one YAML file mapped onto the components' settings dataclasses, each defined beside its
component (`data.settings`, `retrieval.settings`, `reader.settings`, `training.settings`, `probe`,
`base.fusion`), composed here into `RunConfig` with the run's own keys (seed, threads, inference), with dotted
`--set` overrides, range checks at load, and errors that name the file, the key and the valid keys. The library
never imports this module (tests/test_architecture.py). Torch-free.
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
from .data.settings import DataConfig
from .probe import ProbeSettings
from .reader.settings import ReaderSettings
from .retrieval.settings import RetrieverSettings
from .training.settings import DistillSettings

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """Invalid configuration; the message names the file and the key at fault and what would be valid."""


@dataclass
class InferenceSettings:
    """The prediction stage's settings (core/stages.py, `predict`): the run's own, beside the run config."""

    top_n: int = 2  # per head: 2 heads x 2 = 4 contexts per query
    # validation predictions (what the learned context selector trains on) for at most this many validation
    # queries, a sample fixed by the run's seed; null: every validation query
    val_queries: int | None = None
    split: str = "test"
    rank_order: list[str] = field(default_factory=lambda: ["image", "text"])  # interleaving of the heads' lists
    fusion: FusionSettings = field(default_factory=FusionSettings)  # how the contexts' answers become one answer
    # re-weight each prompt's answer distribution by the training split's answer frequencies (core/tasks.py
    # `Task.with_prior`): undoes the uniform answer prior that reader.finetune.balanced_sampling trains in, so a
    # reader trained 50/50 answers for the split's own prior (BreastMNIST: 73 % "no"); needs balanced_sampling
    prior_correction: bool = False


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
              ("inference",): {"val_queries": None, "prior_correction": False}}


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
    if cfg.inference.prior_correction and not cfg.reader.finetune.balanced_sampling:
        raise ConfigError(f"{where}: inference.prior_correction undoes the uniform answer prior that "
                          f"reader.finetune.balanced_sampling trains in; set reader.finetune.balanced_sampling: true "
                          f"or inference.prior_correction: false")
    if cfg.inference.split not in ("train", "val", "test"):
        raise ConfigError(f"{where}: inference.split must be train, val or test")
