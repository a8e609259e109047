"""Recipes are bounded input (issue 15, finding 6): size, nesting and alias expansion are checked before
any object is built, so a hostile recipe fails at once with a RecipeError instead of hanging."""

from __future__ import annotations

import pytest

from deepsqueeze.errors import RecipeError
from deepsqueeze.recipes.schema import (
    MAX_RECIPE_BYTES,
    MAX_RECIPE_DEPTH,
    MAX_RECIPE_VALUES,
    load_recipe,
    load_yaml_bounded,
)

LAUGHS = "\n".join(
    ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
)


def write(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_billion_laughs_is_refused(tmp_path):
    # 9**10 (3.5 billion) strings from under 1 kB, placed where the stage type goes
    text = LAUGHS + "\nstages:\n  - type: *a9\n"
    with pytest.raises(RecipeError, match=f"more than {MAX_RECIPE_VALUES:,} values"):
        load_recipe(write(tmp_path, text))


def test_small_aliases_are_fine(tmp_path):
    text = ("stages:\n  - type: prune\n    exclude: &keep [fc3]\n  - type: share\n    exclude: *keep\n")
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.stages[0].exclude == recipe.stages[1].exclude == ["fc3"]


@pytest.mark.parametrize("nested", [
    "[" * 100_000 + "]" * 100_000,           # flow style
    "".join(f"{' ' * i}k:\n" for i in range(1_200)) + " " * 1_200 + "v",  # block style (under 1 MB)
])
def test_deep_nesting_is_refused(tmp_path, nested):
    with pytest.raises(RecipeError, match="nested more than|maximum nesting depth"):
        load_recipe(write(tmp_path, f"description: x\nstages: {nested}\n" if nested.startswith("[") else nested))


def test_depth_up_to_the_limit_is_fine():
    text = "[" * (MAX_RECIPE_DEPTH - 1) + "1" + "]" * (MAX_RECIPE_DEPTH - 1)
    value = load_yaml_bounded(text)
    for _ in range(MAX_RECIPE_DEPTH - 1):
        value = value[0]
    assert value == 1


def test_a_file_over_the_size_limit_is_refused_unparsed(tmp_path):
    text = "stages:\n  - type: finetune\n" + "# padding\n" * (MAX_RECIPE_BYTES // 10)
    with pytest.raises(RecipeError, match="larger than 1,000,000 bytes"):
        load_recipe(write(tmp_path, text))


def test_scientific_notation_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; recipes follow YAML 1.2 so that strict number fields accept it
    recipe = load_recipe(write(tmp_path, "stages:\n  - type: finetune\n    lr: 1e-4\n    epochs: 2E0\n"))
    assert recipe.stages[0].lr == 1e-4 and recipe.stages[0].epochs == 2.0
    with pytest.raises(RecipeError, match="epochs"):
        load_recipe(write(tmp_path, "stages:\n  - type: finetune\n    epochs: 1e300\n"))


@pytest.mark.parametrize("text, needle", [
    ("seed: true\nstages:\n  - type: finetune\n", "seed"),
    ("seed: 99999999999999\nstages:\n  - type: finetune\n", "seed"),
    ("stages:\n  - type: quantize\n    bits: true\n", "bits"),
    ("stages:\n  - type: finetune\n    lr: .nan\n", "lr"),
    ("stages:\n  - type: finetune\n    epochs: .inf\n", "epochs"),
    ("stages:\n  - type: prune\n    sparsity: 2\n", "sparsity"),
    ("stages: [\n", "not valid YAML"),
])
def test_bad_values_are_recipe_errors(tmp_path, text, needle):
    with pytest.raises(RecipeError, match=needle):
        load_recipe(write(tmp_path, text))
