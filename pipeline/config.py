"""Typed configs: frozen dataclass trees with defaults in Python, YAML files, `--set a.b.c=value` overrides.

    cfg = load_config("configs/pretrain_o365.yaml", ["model.co.lambda1=0.5", "model.co.aux_heads=[atss]"])
    print(dump_yaml(cfg))

Rules:
- A YAML file is a partial tree of the job config; anything it leaves out keeps its Python default. It may name
  one `base:` file (relative to itself) that is loaded first.
- Unknown keys are errors naming the full dotted path and the valid keys at that level.
- Values are coerced to the field's annotated type (int, float, str, bool, tuples, Optional, Literal, nested
  dataclasses); a value that does not fit is an error naming the path, the value and the expected type.
- The resolved config is dumped to YAML with every run and checkpoint (`dump_yaml`), and flattened to dotted
  keys for MLflow params (`flatten`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

from pipeline.data.config import DataConfig
from pipeline.models.config import ModelConfig
from pipeline.train.config import EvalConfig, InitConfig, ScalingConfig, TrackingConfig, TrainConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config tree (one-line message)."""


# Keys that earlier versions wrote into saved configs (a checkpoint's config.yaml, MLflow run artifacts, Tune's
# best_config.yaml) and that no longer exist: read with a warning and ignored, so old checkpoints and runs still
# load. (class, key) -> why it went.
RETIRED_KEYS: dict[tuple[type, str], str] = {
    (DataConfig, "shuffle_buffer"): "the epoch plan orders the rows of each row group (pipeline/data/plan.py)",
}


# ---------------------------------------------------------------------------------------------------------------
# dict -> dataclass


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert `value` (from YAML or an override) to the annotated type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: value {value!r} does not fit {_type_name(tp)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{path}: value {value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected a list of {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{path}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a float, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: cannot use {value!r} as {_type_name(tp)}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _keys(cls: type) -> dict[str, str]:
    """YAML key -> field name. A field may carry `metadata={"key": "from"}` to use a Python keyword as key."""
    return {f.metadata.get("key", f.name): f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a (partial) mapping; missing fields keep their defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    keys = _keys(cls)
    retired = [k for k in data if (cls, k) in RETIRED_KEYS]
    for k in retired:
        warnings.warn(f"config key '{f'{path}.{k}' if path else k}' is no longer used and was ignored: "
                      f"{RETIRED_KEYS[(cls, k)]}", stacklevel=2)
    data = {k: v for k, v in data.items() if k not in retired} if retired else data
    unknown = [k for k in data if k not in keys]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise ConfigError(f"unknown config key '{where}' (valid keys here: {', '.join(keys)})")
    kwargs = {keys[k]: _coerce(v, hints[keys[k]], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list/scalars (tuples become lists) for YAML/JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.metadata.get("key", f.name): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> scalar values (lists rendered as strings), e.g. for MLflow params."""
    out: dict[str, Any] = {}
    d = to_dict(cfg)
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v if not isinstance(v, list) else str(v)
    return out


# ---------------------------------------------------------------------------------------------------------------
# files and overrides


def read_yaml(path: str) -> dict[str, Any]:
    """Read a config YAML (local path or any storage URI), resolving one level of `base:`."""
    from pipeline import storage

    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:
        base_path = base if os.path.isabs(base) or "://" in base else os.path.join(os.path.dirname(path), base)
        base_data = read_yaml(base_path)
        if "base" in base_data:
            raise ConfigError(f"{base_path}: a base file may not name another base (one level only)")
        data = deep_merge(base_data, data)
    return data


def deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML: 3 -> int, [x, y] -> list, true -> bool)."""
    if "=" not in text:
        raise ConfigError(f"bad override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cls: type, data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each `a.b.c=value` into the nested dict `data`, checking the key path against the dataclass tree."""
    data = dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node_cls: Any = cls
        node = data
        for i, k in enumerate(keys):
            fields = _keys(node_cls)
            if k not in fields:
                where = ".".join(keys[: i + 1])
                raise ConfigError(f"unknown config key '{where}' in override {text!r} (valid keys here: "
                                  f"{', '.join(fields)})")
            tp = _hints(node_cls)[fields[k]]
            if i == len(keys) - 1:
                node[k] = value
                break
            sub = _dataclass_of(tp)
            if sub is None:
                raise ConfigError(f"override {text!r}: '{'.'.join(keys[: i + 1])}' is not a section")
            child = node.get(k)
            node[k] = dict(child) if isinstance(child, Mapping) else {}
            node, node_cls = node[k], sub
    return data


def _dataclass_of(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def load(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults <- YAML file (optional) <- overrides, validated into `cls`."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(cls, data, overrides)
    return from_dict(cls, data)


def replace(cfg: T, **changes: Any) -> T:
    """`dataclasses.replace` with dotted keys: replace(cfg, **{"model.co.lambda1": 0.5})."""
    nested: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    kwargs = {}
    for head, value in nested.items():
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(cfg, head)):
            kwargs[head] = replace(getattr(cfg, head), **value)
        else:
            kwargs[head] = value
    return dataclasses.replace(cfg, **kwargs)  # type: ignore[type-var]


# ---------------------------------------------------------------------------------------------------------------
# the job config tree shared by every job


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The generated dataset used when `data.shards` is empty (embedded defaults: laptop, CI, tests)."""

    style: str = "o365"  # coco | o365 | lvis (field layout and class names of that dataset)
    images: int = 96  # training images
    val_images: int = 24  # validation images
    classes: int = 20  # categories (names shared across styles so stages can remap heads by name)
    image_size: tuple[int, int] = (160, 256)  # min and max image side in pixels
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Everything one stage job needs. Python defaults are the authors' R50 recipe; `configs/local/*.yaml` are the
    embedded laptop defaults (tiny model, synthetic data)."""

    name: str = ""  # run name; "" = <stage>-<dataset>. (storage_path, name) is the resume key.
    stage: str = "pretrain"  # pretrain | finetune (MLflow experiment family)
    dataset: str = "o365"  # o365 | coco | lvis: the registered model is codetr-<dataset>
    work_dir: str = ".codetr"  # local working directory: generated data, SQLite MLflow, Ray results
    storage_path: str = ""  # Ray Train storage for checkpoints; "" = <work_dir>/ray_results (s3:// on clusters)
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)

    def __post_init__(self) -> None:
        if self.stage not in ("pretrain", "finetune"):
            raise ValueError(f"stage must be 'pretrain' or 'finetune', got {self.stage!r}")
        if self.dataset not in ("o365", "coco", "lvis"):
            raise ValueError(f"dataset must be 'o365', 'coco' or 'lvis', got {self.dataset!r}")
        vit, aug = self.model.backbone.vit, self.data.augment
        lsj_vit = self.model.backbone.name == "vit_authors" and vit.use_lsj and aug.policy == "lsj"
        if lsj_vit and vit.img_size != aug.lsj_size:
            raise ValueError(f"model.backbone.vit.img_size ({vit.img_size}) must equal data.augment.lsj_size "
                             f"({aug.lsj_size}) with use_lsj: the global rotary grid is fixed at img_size / patch")

    @property
    def run_name(self) -> str:
        return self.name or f"{self.stage}-{self.dataset}"


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> JobConfig:
    """The job config: Python defaults <- YAML `path` <- `--set` overrides."""
    return load(JobConfig, path, overrides)
