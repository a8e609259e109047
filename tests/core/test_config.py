import pytest
from pydantic import ValidationError

from deepsqueeze.core import config_from_dict, config_to_dict, registered_stages
from deepsqueeze.errors import RecipeError


def test_every_registered_config_round_trips_through_its_recipe_form():
    stages = registered_stages()
    assert "finetune" in stages
    for name, cls in stages.items():
        config = cls.example()
        again = config_from_dict(config_to_dict(config))
        assert again == config, name
        assert config_to_dict(again)["type"] == name


def test_unknown_key_names_the_key_the_stage_and_the_allowed_keys():
    with pytest.raises(RecipeError) as info:
        config_from_dict({"type": "finetune", "epoch": 2})
    message = str(info.value)
    assert "'epoch'" in message and "finetune" in message and "did you mean 'epochs'" in message
    assert "allowed keys: epochs" in message


def test_unknown_stage_type_suggests_the_closest():
    with pytest.raises(RecipeError, match="did you mean 'finetune'"):
        config_from_dict({"type": "finetun"})


def test_invalid_values_and_missing_type_are_recipe_errors():
    with pytest.raises(RecipeError, match="lr"):
        config_from_dict({"type": "finetune", "lr": -1})
    with pytest.raises(RecipeError, match="missing 'type'"):
        config_from_dict({"epochs": 1})
    with pytest.raises(RecipeError, match="expected a mapping"):
        config_from_dict(["finetune"])  # type: ignore[arg-type]


def test_configs_are_immutable():
    config = config_from_dict({"type": "finetune"})
    with pytest.raises(ValidationError):
        config.epochs = 3  # type: ignore[misc]
