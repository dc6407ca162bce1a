"""The typed config builder: unknown keys named with their path, values checked against
the field's annotation, nested dataclasses, keyword arguments of a function."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from oceanda.assim.fourdvarnet import ModelConfig
from oceanda.config_dataclass import check_value, dataclass_from_dict, from_mapping, kwargs_for
from oceanda.errors import ConfigError
from oceanda.train.fourdvarnet import TrainConfig


@dataclass(frozen=True)
class Inner:
    k: int = 1


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = Inner()
    size: tuple[int, int] = (1, 2)
    scale: float = 1.0
    flag: bool = False
    maybe: float | None = None
    items: list[float] = field(default_factory=list)


def test_known_keys_build_the_dataclass():
    cfg = dataclass_from_dict(ModelConfig, {"n_steps": 3}, "model")
    assert cfg.n_steps == 3 and cfg == ModelConfig(n_steps=3)
    assert TrainConfig.from_dict({"seed": 5}).seed == 5
    o = from_mapping(Outer, {"name": "a", "inner": {"k": 4}, "size": [3, 4], "scale": 2, "items": [1, 2.5]})
    assert o == Outer("a", Inner(4), (3, 4), 2.0, items=[1.0, 2.5])
    assert isinstance(o.scale, float) and isinstance(o.size, tuple) and all(isinstance(v, float) for v in o.items)


@pytest.mark.parametrize("cls,what", [(ModelConfig, "model"), (TrainConfig, "train")])
def test_unknown_keys_are_named_with_their_path(cls, what):
    with pytest.raises(ConfigError, match=rf"unknown keys {what}\.bogus, {what}\.zzz; known: "):
        cls.from_dict({"bogus": 1, "zzz": 2})


@pytest.mark.parametrize("data,match", [
    ({"name": "a", "inner": {"kk": 1}}, r"unknown key x\.inner\.kk"),
    ({}, r"missing key x\.name"),
    ({"name": 3}, r"x\.name: expected a string, got 3"),
    ({"name": "a", "size": [1, 2, 3]}, r"x\.size: expected a list of 2 values"),
    ({"name": "a", "size": "big"}, r"x\.size: expected a list of 2 values"),
    ({"name": "a", "inner": {"k": 1.5}}, r"x\.inner\.k: expected an integer, got 1\.5"),
    ({"name": "a", "inner": {"k": True}}, r"x\.inner\.k: expected an integer, got True"),
    ({"name": "a", "scale": "2"}, r"x\.scale: expected a number"),
    ({"name": "a", "flag": "yes"}, r"x\.flag: expected true or false"),
    ({"name": "a", "maybe": "no"}, r"x\.maybe: expected a number or null"),
    ({"name": "a", "items": [1, "b"]}, r"x\.items\[1\]: expected a number"),
])
def test_bad_values_are_refused_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_mapping(Outer, data, "x")


def test_value_checks_of_the_dataclass_run():
    with pytest.raises(ConfigError, match="model.oi_noise_std must be > 0"):
        from_mapping(ModelConfig, {"oi_noise_std": -1}, "model")


def test_keyword_arguments_of_a_function():
    def f(a: int, b: float = 1.0, c: str | None = None):
        return a, b, c

    assert kwargs_for(f, {"a": 2, "b": 3}, "m") == {"a": 2, "b": 3.0}
    with pytest.raises(ConfigError, match=r"unknown key m\.d; known: a, b, c"):
        kwargs_for(f, {"a": 1, "d": 0}, "m")
    with pytest.raises(ConfigError, match=r"missing key m\.a"):
        kwargs_for(f, {}, "m")
    with pytest.raises(ConfigError, match=r"m\.c: expected a string or null"):
        kwargs_for(f, {"a": 1, "c": 5}, "m")
    assert check_value(int | float, 3, "v") == 3 and isinstance(check_value(int | float, 3, "v"), int)
