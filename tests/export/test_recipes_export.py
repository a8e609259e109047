"""Every shipped recipe without a training stage, applied to a small trained model, exports to ONNX and
matches its .dsq (or is refused in one line); the training recipes end in the same representations,
which ``test_onnx.py`` exports one by one."""

from __future__ import annotations

import contextlib

import pytest

pytest.importorskip("onnxruntime")

import deepsqueeze  # noqa: E402
from deepsqueeze.errors import DeepsqueezeWarning  # noqa: E402
from deepsqueeze.export import export  # noqa: E402
from deepsqueeze.recipes import compress, load_recipe  # noqa: E402
from deepsqueeze.recipes.schema import shipped_recipes  # noqa: E402


def _trains(name: str) -> bool:
    recipe = load_recipe(name)
    return any(getattr(stage, "epochs", 0) or stage.stage_type in ("distill", "finetune", "qat")
               or getattr(stage, "method", None) == "qat" for stage in recipe.stages)


NO_TRAINING = [name for name in sorted(shipped_recipes()) if not _trains(name) and "minilm" not in name
               and "transformer" not in name and "3layer" not in name]


def test_the_no_training_recipes_are_the_quantization_and_factorization_ones():
    assert {"int8-dynamic", "int8-static", "w4-rtn", "w4-gptq", "mixed-precision"} <= set(NO_TRAINING)


@pytest.mark.parametrize("name", NO_TRAINING)
def test_shipped_recipe_exports_to_onnx_matching_its_dsq(tmp_path, name, lenet300_digits, digits):
    out = tmp_path / "m.dsq"
    recipe = load_recipe(name)
    # llama.cpp's layouts hold rows of whole blocks of 32: LeNet-300's 300- and 100-wide rows stay float, said so
    gguf = any(getattr(stage, "gguf_type", None) for stage in recipe.stages)
    with pytest.warns(DeepsqueezeWarning, match="whole blocks of 32") if gguf else contextlib.nullcontext():
        compress("zoo:lenet300@digits", recipe, out, "digits", progress=False, evaluate_result=False)
    model = deepsqueeze.load(out)
    images = next(iter(digits.batches("test", batch_size=64)))[0]
    result = export(model, "onnx", tmp_path / "m.onnx", sample=images)
    assert result.check["worst_cosine_distance"] <= result.check["tolerance"]
    assert result.check["top1_agreement"] >= 0.98
    assert result.bytes <= max(2.5 * out.stat().st_size, out.stat().st_size + 20_000)
