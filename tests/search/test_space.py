"""Spaces: holes, per-layer expansion, optional stages and the grid, checked on exact recipes."""

import optuna
import pytest

from deepsqueeze.errors import RecipeError
from deepsqueeze.search import parse_space
from deepsqueeze.search.front import compact_recipe

LAYERS = ["1", "3", "5"]


def lister(stage_type, patterns):
    return [n for n in LAYERS if not patterns or n in patterns]


SPACE = {
    "stages": [
        {"type": "prune", "optional": True, "sparsity": {"per_layer": {"low": 0.5, "high": 0.9, "step": 0.2}}},
        {"type": "quantize", "method": "rtn", "bits": {"per_layer": {"choice": [4, 8, None]}, "layers": ["1", "5"]}},
        {"type": "finetune", "epochs": {"choice": [0.5, 2]}, "lr": 0.001},
    ]
}


def test_a_point_is_an_ordinary_recipe_with_per_layer_values():
    space = parse_space(SPACE, lister)
    trial = optuna.trial.FixedTrial({
        "0.prune.run": True, "0.prune.sparsity[1]": 0.7, "0.prune.sparsity[3]": 0.9, "0.prune.sparsity[5]": 0.5,
        "1.quantize.bits[1]": 4, "1.quantize.bits[5]": None, "2.finetune.epochs": 2,
    })
    recipe = space.point(trial, "zoo:lenet300@digits", "digits:val")
    stages = compact_recipe(recipe.to_dict())["stages"]
    # prune and quantize take per-layer values through their own overrides (one GPTQ pass for all widths);
    # a null leaves the layer in float, a layer without a hole follows the stage's fields
    assert stages == [
        {"type": "prune", "overrides": {"1": 0.7, "3": 0.9, "5": 0.5}},
        {"type": "quantize", "method": "rtn", "exclude": ["5"], "overrides": {"1": 4}},
        {"type": "finetune", "epochs": 2.0, "lr": 0.001},
    ]
    assert recipe.model == "zoo:lenet300@digits" and recipe.data == "digits:val"


def test_an_optional_stage_left_out_and_the_grid():
    space = parse_space(SPACE, lister)
    grid = space.grid()
    assert grid["0.prune.run"] == [True, False]
    assert grid["0.prune.sparsity[3]"] == [0.5, 0.7, 0.9]
    assert grid["1.quantize.bits[5]"] == [4, 8, None]
    assert "1.quantize.bits[3]" not in grid
    params = {name: values[0] for name, values in grid.items()}
    params["0.prune.run"] = False
    recipe = space.point(optuna.trial.FixedTrial(params), "zoo:lenet300", None)
    assert [s.stage_type for s in recipe.stages] == ["quantize", "finetune"]
    assert recipe.stages[0].overrides == {"1": 4, "5": 4}


@pytest.mark.parametrize("stages, match", [
    ([{"type": "prune", "sparsity": {"low": 0.9, "high": 0.1}}], "low <= high"),
    ([{"type": "prune", "sparsity": {"lo": 0.1}}], "sparsity"),
    ([{"type": "prune", "sparsity": {"choice": []}}], "non-empty"),
    ([{"type": "prune", "sparstiy": 0.5}], "did you mean 'sparsity'"),
    ([{"type": "prunee"}], "did you mean 'prune'"),
    ([{"type": "finetune", "epochs": {"per_layer": {"choice": [1, 2]}}}], "cannot be set per layer"),
])
def test_bad_spaces_are_recipe_errors(stages, match):
    with pytest.raises(RecipeError, match=match):
        parse_space({"stages": stages}, lister)


def test_objectives_and_constraints_are_checked():
    with pytest.raises(RecipeError, match="objectives"):
        parse_space({**SPACE, "objectives": ["bytes"]}, lister)
    with pytest.raises(RecipeError, match="unknown constraint 'max_size'"):
        parse_space({**SPACE, "constraints": {"max_size": 3}}, lister)


def test_a_continuous_hole_cannot_be_gridded():
    space = parse_space({"stages": [{"type": "prune", "sparsity": {"low": 0.1, "high": 0.9}}]}, lister)
    with pytest.raises(RecipeError, match="grid sampler needs a finite hole"):
        space.grid()


PRUNE = [{"type": "prune", "sparsity": {"choice": [0.5]}}]


@pytest.mark.parametrize("space, match", [
    ({"constraints": ["max_bytes"], "stages": PRUNE}, "constraints is a mapping"),  # AttributeError before
    ({"constraints": {"max_bytes": float("nan")}, "stages": PRUNE}, "non-negative number"),
    ({"objectives": 7, "stages": PRUNE}, "objectives"),  # TypeError
    ({"objectives": "quality", "stages": PRUNE}, "objectives"),
    ({"latency": {"batch": "raw"}, "stages": PRUNE}, "latency batch"),  # ValueError: int('raw')
    ({"latency": {"batch": [64]}, "stages": PRUNE}, "latency batch"),  # TypeError
    ({"latency": {"threads": 0}, "stages": PRUNE}, "latency threads"),
    ({"seed": 2**63, "stages": PRUNE}, "seed"),  # NumPy takes 32 bits: ValueError at the sampler
    ({"trials": True, "stages": PRUNE}, "trials"),
    ({"model": ["zoo:lenet300"], "stages": PRUNE}, "model must be a string"),
    ({"stages": [{"type": "prune", "sparsity": {"low": float("nan"), "high": 0.9}}]}, "low and high"),
    ({"stages": [{"type": "prune", "sparsity": {"low": -1e308, "high": 1e308, "step": 0.25}}]}, "low and high"),
    ({"stages": [{"type": "prune", "sparsity": {"low": 0, "high": 1, "step": 1e-300}}]}, "2\\*\\*53 values"),
    ({"stages": [{"type": "prune", "sparsity": {"low": 0, "high": 1, "log": "yes"}}]}, "log is true or false"),
    ({"stages": [{"type": "prune", "sparsity": {"per_layer": {"choice": [0.5]}, "layers": "1"}}]}, "layers is a list"),
    ({"stages": [{"type": "prune", "sparsity": {"per_layer": {"choice": [0.5]}, "layers": [1]}}]}, "layers is a list"),
    ({"stages": [{"type": "prune", 5: 1}]}, "field names are strings"),
    ({"stages": [{"type": "prune", "overrides": 5, "sparsity": {"per_layer": {"choice": [0.5]}}}]}, "overrides"),
])
def test_hostile_space_fields_are_recipe_errors(space, match):
    """Found by the space fuzzer (tests/fuzz/test_space.py): each raised AttributeError, TypeError, ValueError or
    decimal.InvalidOperation (Optuna's stepped range) instead of one RecipeError."""
    with pytest.raises(RecipeError, match=match):
        parse_space(space, lister)


@pytest.mark.parametrize("text", ["stages: [{type: quantize, bits: {low: 2, high: 1" + "0" * 5000 + "}}]\n",
                                  "stages: [{type: prune, sparsity: {choice: [!!binary aGVsbG8]}}]\n"])
def test_yaml_values_python_cannot_convert_are_recipe_errors(tmp_path, text):
    from deepsqueeze.search.space import read_space_file

    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(RecipeError, match="YAML"):
        read_space_file(tmp_path / "s.yaml")


@pytest.mark.parametrize("name", ["cnn-bits", "cnn-sparsity", "encoder-heads-and-bits"])
def test_shipped_spaces_load_by_name_on_the_models_they_describe(name, tmp_path):
    """Issue 29 finding 6: no example space shipped; each is found by name and opens its holes on a model."""
    from deepsqueeze.recipes.schema import shipped_spaces
    from deepsqueeze.search.space import load_space
    from deepsqueeze.testing.hf_models import make_hf_dir

    assert name in shipped_spaces() and shipped_spaces()[name]
    model = f"hf:{make_hf_dir('bert', tmp_path / 'bert')}" if name.startswith("encoder") \
        else "py:deepsqueeze.testing.models:TinyResNet"
    space, _model = load_space(name, model)
    assert space.stages and space.description


def test_search_takes_a_shipped_space_by_name_and_suggests_the_nearest(tmp_path, capsys):
    from deepsqueeze.testing.cli import run

    code, _out, err = run(capsys, "search", "--space", "cnn-bits", "--model", "py:deepsqueeze.testing.models:PlainMLP",
                          "--data", "digits", "--trials", "1", "--out", str(tmp_path / "s"), "--json")
    assert code == 0, err
    code, _out, err = run(capsys, "search", "--space", "cnn-bit", "--model", "py:deepsqueeze.testing.models:PlainMLP",
                          "--data", "digits", "--out", str(tmp_path / "t"))
    assert code == 2 and "did you mean 'cnn-bits'" in err and len(err.strip().splitlines()) == 1


def test_the_docstring_example_space_runs_without_a_warning(tmp_path):
    """Issue 29 finding 5: the documented example pruned before per-layer packed bits (the pruning saved nothing
    and a warning leaked into search's output). The example as written runs two trials, no warning."""
    import yaml

    import deepsqueeze.search.space as space_module
    from deepsqueeze.testing.conformance import cli

    doc = space_module.__doc__
    block = doc[doc.index("    model: zoo:lenet300@digits"):doc.index("\nA *hole*")].split("\nPruning belongs")[0]
    data = yaml.safe_load("\n".join(line[4:] for line in block.splitlines()))
    data.pop("compare")  # reference recipes are measured with their own settings, not the example's
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    code, _out, err, _s = cli(["search", "--space", str(tmp_path / "s.yaml"), "--model",
                               "py:deepsqueeze.testing.models:PlainMLP", "--trials", "2", "--out",
                               str(tmp_path / "o"), "--json"])
    assert code == 0, err
    assert "warning" not in err.lower(), err
