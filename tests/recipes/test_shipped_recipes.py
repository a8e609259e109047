"""Shipped recipes (issue 16, findings 5 and 9): each says what it is for, model-specific ones say so in their
name, the transformer-pruning recipe exists, and benchmark rows that stand for a recipe run that recipe."""

import inspect
from pathlib import Path

import pytest

from deepsqueeze.recipes import load_recipe
from deepsqueeze.recipes.schema import shipped_recipes, shipped_recipes_dir

MODEL_NAMES = ("lenet300", "lenet5", "vgg-small", "minilm", "3layer")
ROOT = Path(__file__).resolve().parents[2]


def _names_layers(stage) -> bool:
    return bool(getattr(stage, "overrides", None) or getattr(stage, "include", None)
                or getattr(stage, "keep", None) or getattr(stage, "drop_layers", None))


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_a_recipe_naming_layers_says_which_model_it_is_for(name):
    recipe = load_recipe(name)
    assert recipe.description, f"{name} has no description"
    if any(_names_layers(stage) for stage in recipe.stages):
        assert recipe.model or any(model in name for model in MODEL_NAMES), \
            f"{name} names layers of one model but neither its name nor 'model:' says which"


def test_transformer_pruning_recipe_prunes_heads_and_ffn_then_distills():
    recipe = load_recipe("prune-transformer")
    prune, distill = recipe.stages
    assert prune.stage_type == "prune_transformer" and prune.heads > 0 and prune.ffn_ratio > 0
    assert distill.stage_type == "distill" and distill.student == "self" and distill.epochs > 0


def test_prune_structured_recipe_carries_the_benchmark_budget_and_the_benchmark_runs_it():
    import benchmarks.prune_structured as bench

    assert bench.RECIPE == "prune-structured" and (shipped_recipes_dir() / "prune-structured.yaml").is_file()
    assert load_recipe("prune-structured").stages[0].epochs == 3
    source = inspect.getsource(bench)
    assert "load_recipe(RECIPE)" in source and "compress(" in source
    assert "PruneChannelsConfig(" not in source  # no second copy of the recipe's settings


def test_generic_deep_compression_names_no_layer():
    recipe = load_recipe("deep-compression")
    assert not any(_names_layers(stage) for stage in recipe.stages)
    assert recipe.stages[0].scope.value == "global"


def test_a_recipes_data_does_not_override_the_data_of_the_model_given(tmp_path, lenet300_digits):
    """int8-static says data: fashion-mnist; LeNet-300 trained on digits calibrates on digits, not 28x28 images."""
    from deepsqueeze.recipes import compress

    assert load_recipe("int8-static").data == "fashion-mnist"
    result = compress("zoo:lenet300@digits", load_recipe("int8-static"), tmp_path / "q.dsq", progress=False)
    assert result.metrics["accuracy"] > 0.8
