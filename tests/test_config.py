"""Config machinery: YAML loading, unknown keys, type coercion, overrides, dump round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from pipeline.config import ConfigError, dump_yaml, flatten, from_dict, load, parse_override, replace
from pipeline.train.config import InitConfig


@dataclass(frozen=True)
class CoCfg:
    lambda1: float = 1.0  # weight of the aux decoder losses
    lambda2: float = 2.0  # weight of the aux head (encoder) losses
    aux_heads: tuple[str, ...] = ("atss", "faster_rcnn")


@dataclass(frozen=True)
class ModelCfg:
    num_classes: int = 80
    co: CoCfg = field(default_factory=CoCfg)
    weights: str | None = None
    nms: Literal["soft", "hard", "none"] = "soft"
    size: tuple[int, int] = (800, 1333)


@dataclass(frozen=True)
class Job:
    name: str = "run"
    ema: bool = False
    model: ModelCfg = field(default_factory=ModelCfg)


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_and_partial_yaml(tmp_path):
    cfg = load(Job, write(tmp_path, "model:\n  co:\n    lambda1: 0.5\n"))
    assert cfg.model.co.lambda1 == 0.5 and cfg.model.co.lambda2 == 2.0 and cfg.model.num_classes == 80


def test_unknown_key_names_full_path(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.co\.lamda1'.*lambda1"):
        load(Job, write(tmp_path, "model:\n  co:\n    lamda1: 0.5\n"))


def test_bad_type_names_path_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.num_classes: expected an int, got 'eighty'"):
        load(Job, write(tmp_path, "model:\n  num_classes: eighty\n"))
    with pytest.raises(ConfigError, match=r"model\.nms: value 'soft_nms' is not one of"):
        load(Job, None, ["model.nms=soft_nms"])
    with pytest.raises(ConfigError, match=r"model\.size: expected a list of 2 items"):
        load(Job, None, ["model.size=[1,2,3]"])


def test_overrides_coerce_lists_bools_numbers():
    cfg = load(Job, None, ["model.co.aux_heads=[atss]", "ema=true", "model.co.lambda2=3", "model.weights=null",
                           "model.size=[512, 768]", "name=123"])
    assert cfg.model.co.aux_heads == ("atss",)
    assert cfg.ema is True
    assert cfg.model.co.lambda2 == 3.0 and isinstance(cfg.model.co.lambda2, float)
    assert cfg.model.weights is None and cfg.model.size == (512, 768) and cfg.name == "123"
    assert load(Job, None, ["model.co.aux_heads=[]"]).model.co.aux_heads == ()


def test_bad_overrides():
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.coo'"):
        load(Job, None, ["model.coo.lambda1=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("model.co.lambda1")
    with pytest.raises(ConfigError, match=r"'ema' is not a section"):
        load(Job, None, ["ema.x=1"])
    with pytest.raises(ConfigError, match=r"ema: expected a bool, got 'maybe'"):
        load(Job, None, ["ema=maybe"])


def test_base_file_and_override_order(tmp_path):
    write(tmp_path, "name: base\nmodel:\n  num_classes: 365\n", "base.yaml")
    path = write(tmp_path, "base: base.yaml\nname: child\n")
    cfg = load(Job, path, ["model.num_classes=80"])
    assert cfg.name == "child" and cfg.model.num_classes == 80
    assert load(Job, path).model.num_classes == 365


def test_dump_round_trip_and_flatten(tmp_path):
    cfg = load(Job, None, ["model.co.aux_heads=[atss]", "model.co.lambda1=0.25"])
    text = dump_yaml(cfg)
    again = from_dict(Job, yaml.safe_load(text))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["model.co.lambda1"] == 0.25 and flat["model.co.aux_heads"] == "['atss']"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(Job, str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(Job, write(tmp_path, "model: [unclosed\n"))


def test_replace_dotted():
    cfg = replace(Job(), **{"model.co.lambda1": 0.5, "name": "x"})
    assert cfg.model.co.lambda1 == 0.5 and cfg.name == "x" and cfg.model.num_classes == 80


@dataclass(frozen=True)
class WithInit:
    init: InitConfig = field(default_factory=InitConfig)


def test_keyword_field_alias():
    cfg = load(WithInit, None, ["init.from=models:/codetr-o365@latest"])
    assert cfg.init.from_ == "models:/codetr-o365@latest"
    assert yaml.safe_load(dump_yaml(cfg)) == {"init": {"from": "models:/codetr-o365@latest"}}


def test_retired_key_of_a_saved_config_warns_and_is_ignored():
    """A checkpoint's config.yaml written before `data.shuffle_buffer` was removed still loads."""
    from pipeline.config import JobConfig

    saved = {"name": "old-run", "data": {"batch_size": 3, "shuffle_buffer": 16}}
    with pytest.warns(UserWarning, match=r"config key 'data\.shuffle_buffer' is no longer used"):
        job = from_dict(JobConfig, saved)
    assert job.name == "old-run" and job.data.batch_size == 3
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.shuffle_bufer'"):
        from_dict(JobConfig, {"data": {"shuffle_bufer": 16}})
