"""Typed settings from dicts: unknown keys are named, known ones pass through."""

import pytest

from oceanda.assim.fourdvarnet import ModelConfig
from oceanda.config_dataclass import dataclass_from_dict
from oceanda.errors import ConfigError
from oceanda.train.fourdvarnet import TrainConfig


def test_known_keys_build_the_dataclass():
    cfg = dataclass_from_dict(ModelConfig, {"n_steps": 3}, "model config")
    assert cfg.n_steps == 3 and cfg == ModelConfig(n_steps=3)
    assert TrainConfig.from_dict({"seed": 5}).seed == 5


@pytest.mark.parametrize("cls,what", [(ModelConfig, "model config"), (TrainConfig, "train config")])
def test_unknown_keys_are_named(cls, what):
    with pytest.raises(ConfigError, match=rf"unknown {what} keys \['bogus', 'zzz'\]"):
        cls.from_dict({"bogus": 1, "zzz": 2})
