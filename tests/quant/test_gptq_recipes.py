"""The shipped w4-gptq, mixed-precision and int8-smoothquant recipes run as stages and their artifacts round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.quant import Int8Linear, PackedIntLinear
from deepsqueeze.recipes import load_recipe
from deepsqueeze.recipes.run import run_stages
from deepsqueeze.testing.models import tiny_classification_data, tiny_model_handle

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("recipe", ["w4-gptq.yaml", "mixed-precision.yaml"])
def test_recipe_quantizes_and_round_trips(recipe, tmp_path):
    model, data = tiny_model_handle(), tiny_classification_data()
    ctx = run_stages(model, load_recipe(RECIPES / recipe), data, progress=False)
    assert ctx.report[0]["calibration_batches"] > 0
    layers = [model.module.fc1, model.module.fc2, model.module.fc3]
    assert all(isinstance(layer, PackedIntLinear) for layer in layers)
    widths = [layer.bits for layer in layers]
    if recipe == "w4-gptq.yaml":
        assert widths == [4, 4, 4]
    else:
        sizes = [layer.in_features * layer.out_features for layer in layers]
        assert sum(w * n for w, n in zip(widths, sizes, strict=True)) <= 4.0 * sum(sizes)
    save(model, tmp_path / "m.dsq")
    loaded = load(tmp_path / "m.dsq", model="py:deepsqueeze.testing.models:TinyMLP")
    x = data.test_x[:64]
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model.module(x))


def test_smoothquant_recipe_calibrates_smooths_and_round_trips(tmp_path):
    model, data = tiny_model_handle(), tiny_classification_data()
    ctx = run_stages(model, load_recipe(RECIPES / "int8-smoothquant.yaml"), data, progress=False)
    assert ctx.report[0]["calibration_batches"] > 0
    layers = [model.module.fc1, model.module.fc2, model.module.fc3]
    assert all(isinstance(layer, Int8Linear) and layer.smooth is not None for layer in layers)
    save(model, tmp_path / "m.dsq")
    x = data.test_x[:64]
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m.dsq", model="py:deepsqueeze.testing.models:TinyMLP").module(x), model.module(x))
