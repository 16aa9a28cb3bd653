"""Typed configs from plain data: every recipe round-trips, bad keys and types are named."""
import dataclasses

import pytest

from imagen_core.config_io import ConfigError, build, to_dict
from imagen_core.recipes import STAGE_RECIPES, stage_recipe
from imagen_core.stage import StageConfig


@pytest.mark.parametrize("name", sorted(STAGE_RECIPES))
def test_stage_recipes_round_trip_through_plain_data(name):
    config = stage_recipe(name)
    assert build(StageConfig, to_dict(config)) == config


def test_unknown_key_is_named_with_the_valid_ones():
    data = to_dict(stage_recipe("tiny_base"))
    data["unet"]["base_chanels"] = 8
    with pytest.raises(ConfigError, match=r"unet: unknown key\(s\) \['base_chanels'\].*base_channels"):
        build(StageConfig, data)


def test_wrong_type_and_bad_choice_are_named():
    data = to_dict(stage_recipe("tiny_base"))
    data["cond_drop_prob"] = "ten percent"
    with pytest.raises(ConfigError, match="cond_drop_prob: expected float"):
        build(StageConfig, data)
    data = to_dict(stage_recipe("tiny_base"))
    data["prediction"] = "x0"
    with pytest.raises(ConfigError, match=r"prediction: 'x0' is not one of \['eps', 'v'\]"):
        build(StageConfig, data)


def test_validation_in_the_config_itself_is_reported_with_its_place():
    data = to_dict(dataclasses.replace(stage_recipe("tiny_base")))
    data["cond_drop_prob"] = 1.5
    with pytest.raises(ConfigError, match="cond_drop_prob must be in"):
        build(StageConfig, data)
