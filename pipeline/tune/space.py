"""The search's config and its space: named job-config fields -> Ray Tune domains, checked before any trial.

    search:
      space:
        model.co.lambda1: {type: loguniform, lower: 0.25, upper: 4}
        model.co.aux_heads: {type: choice, values: [[], [atss], [atss, faster_rcnn]]}
        train.lr: {type: loguniform, lower: 1.0e-4, upper: 1.0e-3}      # any field, by its dotted name

A space key is the dotted YAML path of one leaf field of `JobConfig` (`init.from`, not `init.from_`). Domains:
`uniform` / `loguniform` (float fields, lower <= x <= upper), `randint` (int fields, lower..upper inclusive),
`choice` (any field; `values` are YAML values of that field; sampled), `grid` (every value, in order, each
`num_samples` times; not with Optuna). Validation (`check_space`) builds the job config
with every domain end point and every choice, so a value the config rejects (unknown aux head, wrong type)
or a negative weight fails with one line before Ray starts anything.

Choices that are not plain scalars (lists such as aux head sets) go to Tune as their YAML text ("[atss]") so
that every search algorithm can hold them (Optuna categoricals take scalars only); `decode_params` maps them
back.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from pipeline.config import ConfigError, JobConfig, from_dict, to_dict

# Fields no validator of the job config guards but that must not be negative (loss weights, lr, decay);
# model.co.lambda1 / lambda2 are guarded by CoConfig itself.
NON_NEGATIVE = ("train.lr", "train.weight_decay")
NON_NEGATIVE_PREFIXES = ("model.loss.", "model.matcher.")
# Fields the search sets itself (run names, storage, tracking): not searchable.
RESERVED = ("name", "storage_path", "work_dir", "data.shards")
RESERVED_PREFIXES = ("tracking.",)


@dataclass(frozen=True)
class ParamSpec:
    """One dimension of the search."""

    type: Literal["uniform", "loguniform", "randint", "choice", "grid"] = "choice"
    lower: float | None = None  # uniform / loguniform / randint: smallest value
    upper: float | None = None  # uniform / loguniform / randint: largest value (inclusive for randint)
    values: tuple[Any, ...] = ()  # choice / grid: the candidate values (YAML values of the field)

    def __post_init__(self) -> None:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"a {self.type} needs a non-empty 'values' list")
            if self.lower is not None or self.upper is not None:
                raise ValueError(f"a {self.type} takes 'values', not 'lower' / 'upper'")
            return
        if self.values:
            raise ValueError(f"a {self.type} domain takes 'lower' and 'upper', not 'values'")
        if self.lower is None or self.upper is None:
            raise ValueError(f"a {self.type} domain needs both 'lower' and 'upper'")
        if not (math.isfinite(self.lower) and math.isfinite(self.upper)) or self.lower > self.upper:
            raise ValueError(f"{self.type} needs finite lower <= upper, got [{self.lower}, {self.upper}]")
        if self.type == "loguniform" and self.lower <= 0:
            raise ValueError(f"loguniform needs lower > 0, got {self.lower}")
        if self.type == "randint" and not (float(self.lower).is_integer() and float(self.upper).is_integer()):
            raise ValueError(f"randint needs integer bounds, got [{self.lower}, {self.upper}]")

    def probes(self) -> list[Any]:
        """Values that stand for the whole domain in validation: its end points, or every choice."""
        if self.type in ("choice", "grid"):
            return list(self.values)
        if self.type == "randint":
            return [int(self.lower), int(self.upper)]  # type: ignore[arg-type]
        return [float(self.lower), float(self.upper)]  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.type in ("choice", "grid"):
            return f"{self.type} " + ", ".join(label(v) for v in self.values)
        return f"{self.type} [{self.lower:g}, {self.upper:g}]"  # type: ignore[str-format]


def _default_space() -> dict[str, ParamSpec]:
    return {
        "model.co.lambda1": ParamSpec("loguniform", 0.25, 4.0),
        "model.co.lambda2": ParamSpec("loguniform", 0.5, 4.0),
        "model.co.aux_heads": ParamSpec("choice", values=((), ("atss",), ("atss", "faster_rcnn"))),
    }


@dataclass(frozen=True)
class SchedulerConfig:
    """Early stopping. ASHA compares trials on `metric` at rungs grace_period * reduction_factor^k."""

    type: Literal["asha", "fifo"] = "asha"  # fifo: no early stopping
    time_attr: Literal["step", "epoch"] = "epoch"  # unit of max_t / grace_period (what the loop reports)
    max_t: int = 12  # a trial's length: train.max_steps (step) or train.epochs (epoch) are set to it
    grace_period: int = 2  # no trial stops before this many units
    reduction_factor: float = 3.0  # keep the top 1/reduction_factor at each rung

    def __post_init__(self) -> None:
        if self.max_t < 1 or not 1 <= self.grace_period <= self.max_t:
            raise ValueError(
                f"scheduler needs 1 <= grace_period <= max_t, got grace_period={self.grace_period}, "
                f"max_t={self.max_t}"
            )
        if self.reduction_factor <= 1:
            raise ValueError(f"scheduler.reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class SearchConfig:
    """A Ray Tune search over named fields of a job config."""

    name: str = "tune-co-heads"  # Tune experiment + MLflow parent run name; re-running the same name resumes
    metric: str = "val/AP"  # reported by the training loop at each evaluation
    mode: Literal["max", "min"] = "max"
    num_samples: int = 8  # trials
    max_concurrent: int = 2  # trials running at once (each holds its own Train workers)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    algo: Literal["random", "optuna"] = "random"  # optuna: TPE (needs `pip install optuna`)
    seed: int = 0  # sampler seed
    space: dict[str, ParamSpec] = field(default_factory=_default_space)
    experiment: str = (
        ""  # MLflow experiment of the parent and child runs; "" = job.tracking.experiment or codetr-tune
    )
    register_best: bool = (
        False  # register the best trial's model (as codetr-<dataset>, alias champion if best)
    )

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"search.name must be a non-empty name without '/', got {self.name!r}")
        if self.num_samples < 1 or self.max_concurrent < 1:
            raise ValueError(
                f"search.num_samples and search.max_concurrent must be >= 1, got "
                f"{self.num_samples} and {self.max_concurrent}"
            )
        if not self.space:
            raise ValueError("search.space is empty: name at least one config field")
        grids = [k for k, v in self.space.items() if v.type == "grid"]
        if grids and self.algo == "optuna":
            raise ValueError(
                f"search.algo=optuna cannot take grid dimensions ({', '.join(grids)}): use choice"
            )


@dataclass(frozen=True)
class TuneJobConfig:
    """The whole search YAML: the job every trial starts from, and the search."""

    job: JobConfig = field(default_factory=JobConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


# ------------------------------------------------------------------------------------------------------------
# fields of the job config by dotted name


def field_type(path: str, root: type = JobConfig) -> Any:
    """Annotated type of the leaf field at dotted YAML path `path`, or ConfigError naming the valid keys."""
    cls: Any = root
    parts = path.split(".")
    for i, part in enumerate(parts):
        keys = {f.metadata.get("key", f.name): f.name for f in dataclasses.fields(cls)}
        if part not in keys:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(
                f"search.space: unknown config field '{path}' (valid keys under {where}: {', '.join(keys)})"
            )
        tp = typing.get_type_hints(cls)[keys[part]]
        if dataclasses.is_dataclass(tp):
            if i == len(parts) - 1:
                raise ConfigError(f"search.space: '{path}' is a config section, not a field")
            cls = tp
        elif i < len(parts) - 1:
            raise ConfigError(
                f"search.space: unknown config field '{path}' ('{'.'.join(parts[: i + 1])}' is a "
                f"field, not a section)"
            )
    return tp


def apply_params(job: JobConfig, params: dict[str, Any]) -> JobConfig:
    """The job config with each dotted field set (values coerced and validated as if read from YAML)."""
    data = to_dict(job)
    for path, value in params.items():
        node = data
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_dict(JobConfig, data)


def check_values(job: JobConfig) -> None:
    """Weights and rates that no config validator guards must not be negative."""
    from pipeline.config import flatten

    for key, value in flatten(job).items():
        guarded = key in NON_NEGATIVE or key.startswith(NON_NEGATIVE_PREFIXES)
        if guarded and isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{key}: value {value!r} is negative; expected >= 0")


def check_space(job: JobConfig, space: dict[str, ParamSpec], fixed: tuple[str, ...] = ()) -> list[JobConfig]:
    """Validate every dimension against the job config; returns the probe configs (one per end point or
    choice).

    `fixed`: fields the search sets itself (e.g. train.max_steps from the scheduler's max_t)."""
    check_values(job)
    probes: list[JobConfig] = []
    for path, spec in space.items():
        tp = field_type(path)
        if path in RESERVED or path.startswith(RESERVED_PREFIXES) or path in fixed:
            raise ConfigError(f"search.space: '{path}' is set by the search itself and cannot be searched")
        base_tp = _strip_optional(tp)
        if spec.type in ("uniform", "loguniform") and base_tp is not float:
            raise ConfigError(
                f"search.space.{path}: {spec.type} needs a float field, '{path}' is "
                f"{getattr(base_tp, '__name__', base_tp)}"
            )
        if spec.type == "randint" and base_tp is not int:
            raise ConfigError(
                f"search.space.{path}: randint needs an int field, '{path}' is "
                f"{getattr(base_tp, '__name__', base_tp)}"
            )
        for value in spec.probes():
            try:
                probe = apply_params(job, {path: value})
                check_values(probe)
            except (ConfigError, ValueError) as e:
                msg = str(e).split(": ", 1)[-1] if str(e).startswith(path) else str(e)
                raise ConfigError(
                    f"search.space.{path}: value {label(value)} is outside the field's domain: {msg}"
                ) from None
            probes.append(probe)
    return probes


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


# ------------------------------------------------------------------------------------------------------------
# Tune domains


def label(value: Any) -> str:
    """YAML text of a value: [] / [atss, faster_rcnn] / 0.5."""
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def to_tune_space(space: dict[str, ParamSpec]) -> dict[str, Any]:
    """Ray Tune `param_space` (flat, dotted keys)."""
    from ray import tune

    out: dict[str, Any] = {}
    for path, spec in space.items():
        if spec.type == "uniform":
            out[path] = tune.uniform(spec.lower, spec.upper)
        elif spec.type == "loguniform":
            out[path] = tune.loguniform(spec.lower, spec.upper)
        elif spec.type == "randint":
            out[path] = tune.randint(int(spec.lower), int(spec.upper) + 1)  # type: ignore[arg-type]
        else:
            encode = not all(_scalar(v) for v in spec.values)
            values = [label(v) if encode else v for v in spec.values]
            out[path] = tune.choice(values) if spec.type == "choice" else tune.grid_search(values)
    return out


def decode_params(space: dict[str, ParamSpec], config: dict[str, Any]) -> dict[str, Any]:
    """A trial's Tune config -> {dotted field: value} (YAML-text choices mapped back to their values)."""
    params: dict[str, Any] = {}
    for path, spec in space.items():
        value = config[path]
        if spec.type in ("choice", "grid") and not all(_scalar(v) for v in spec.values):
            by_label = {label(v): v for v in spec.values}
            value = by_label[value] if value in by_label else yaml.safe_load(value)
        params[path] = value
    return params


def trial_run_name(search_name: str, trial_id: str) -> str:
    """The MLflow run name of a trial (the trial's job `name`)."""
    return f"{search_name}-{trial_id}"
