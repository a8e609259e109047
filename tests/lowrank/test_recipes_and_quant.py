"""Shipped low-rank / distillation / LoRA recipes parse; LoRA on a packed low-bit base (QLoRA-style)."""

from __future__ import annotations

import pytest
import torch

from deepsqueeze.artifact import load, save
from deepsqueeze.lowrank import LoRALinear, add_lora_, lora_parameters, merge_lora_
from deepsqueeze.recipes.schema import load_recipe, shipped_recipes_dir
from deepsqueeze.testing.models import tiny_classification_data, tiny_model_handle


@pytest.mark.parametrize("name", ["lowrank-svd", "lowrank-tucker", "distill-3layer", "w3-lora"])
def test_shipped_recipes_parse(name):
    recipe = load_recipe(shipped_recipes_dir() / f"{name}.yaml")
    assert recipe.stages


def test_lora_on_packed_3bit_layers_recovers_and_round_trips(tmp_path):
    quant = pytest.importorskip("deepsqueeze.quant")
    from deepsqueeze.train.loop import train_classifier

    data = tiny_classification_data()
    model = tiny_model_handle()
    train_classifier(model.module, data, epochs=3, lr=1e-2, batch_size=64, progress=False)
    teacher_out = model.module(data.test_x).detach()
    teacher_train = model.module(data.train_x[:256]).detach()
    quant.quantize_(model.module, quant.QuantizeConfig(method="rtn", bits=2, group_size=None, symmetric=False))
    assert isinstance(model.module.fc1, quant.PackedIntLinear)
    codes = model.module.fc1.int_codes().clone()
    gap_before = (model.module(data.test_x) - teacher_out).pow(2).mean().item()
    add_lora_(model, rank=4)
    params = lora_parameters(model)
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = (model.module(data.train_x[:256]) - teacher_train).pow(2).mean()
        loss.backward()
        opt.step()
    assert torch.equal(model.module.fc1.base.int_codes(), codes)  # the packed base stayed frozen
    gap_after = (model.module(data.test_x) - teacher_out).pow(2).mean().item()
    assert gap_after < 0.5 * gap_before
    assert set(merge_lora_(model).values()) == {"side-branch"}
    expected = model.module(data.test_x)
    save(model, tmp_path / "qlora.dsq")
    loaded = load(tmp_path / "qlora.dsq", model="py:deepsqueeze.testing.models:TinyMLP")
    assert isinstance(loaded.module.fc1, LoRALinear) and isinstance(loaded.module.fc1.base, quant.PackedIntLinear)
    assert torch.equal(loaded.module(data.test_x), expected)
