"""decompose_: factored layers equal their factor products, rank rules, budgets, .dsq round trips."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deepsqueeze.artifact import load, save
from deepsqueeze.core.config import config_from_dict, config_to_dict
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task, py_base
from deepsqueeze.errors import RecipeError
from deepsqueeze.lowrank import CPConv2d, LowRankConfig, LowRankLinear, Tucker2Conv2d, decompose_
from deepsqueeze.lowrank.decompose import lowrank_stage
from deepsqueeze.primitives.factorize import cp_reconstruct, svd_factors, tucker2_reconstruct
from deepsqueeze.testing.factor_models import small_convnet
from deepsqueeze.testing.models import tiny_classification_data, tiny_model_handle

CONVNET = "py:deepsqueeze.testing.factor_models:small_convnet"


def _conv_model() -> Model:
    module = small_convnet()
    return Model(module, py_base(module),
                 Task.CLASSIFIER, "py:deepsqueeze.testing.factor_models:small_convnet", count_params(module),
                 (3, 8, 8), 10)


def test_low_rank_linear_is_the_truncated_svd():
    torch.manual_seed(0)
    dense = nn.Linear(12, 9)
    lr = LowRankLinear.from_linear(dense, 4)
    first, second = svd_factors(dense.weight.data, 4)
    torch.testing.assert_close(lr.dense_weight(), second @ first)
    x = torch.randn(5, 12)
    torch.testing.assert_close(lr(x), x @ (second @ first).T + dense.bias, atol=1e-5, rtol=1e-5)
    full = LowRankLinear.from_linear(dense, 9)
    torch.testing.assert_close(full(x), dense(x), atol=1e-5, rtol=1e-5)


def test_tucker2_and_cp_convs_compute_the_reconstructed_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    x = torch.randn(2, 6, 9, 9)
    tk = Tucker2Conv2d.from_conv(conv, (5, 4))
    kernel = tucker2_reconstruct(tk.first.weight[:, :, 0, 0], tk.core.weight, tk.last.weight[:, :, 0, 0])
    torch.testing.assert_close(tk(x), nn.functional.conv2d(x, kernel, conv.bias, stride=2, padding=1),
                               atol=1e-5, rtol=1e-4)
    cp = CPConv2d.from_conv(conv, 6)
    kernel = cp_reconstruct(cp.first.weight[:, :, 0, 0], cp.vertical.weight[:, 0, :, 0],
                            cp.horizontal.weight[:, 0, 0, :], cp.last.weight[:, :, 0, 0])
    torch.testing.assert_close(cp(x), nn.functional.conv2d(x, kernel, conv.bias, stride=2, padding=1),
                               atol=1e-5, rtol=1e-4)
    # Full Tucker ranks reproduce the convolution itself.
    full = Tucker2Conv2d.from_conv(conv, (10, 6))
    torch.testing.assert_close(full(x), conv(x), atol=1e-4, rtol=1e-4)


def test_energy_rule_picks_per_layer_ranks_and_round_trips(tmp_path):
    model = tiny_model_handle()
    x = torch.randn(7, 1, 4, 4)
    summary = decompose_(model, LowRankConfig(rule="energy", energy=0.6))
    assert summary, "some layer must be factored at 60% energy"
    for name, info in summary.items():
        layer = model.module.get_submodule(name)
        assert isinstance(layer, LowRankLinear) and layer.rank == info["rank"]
        assert info["params_after"] < info["params_before"]
        assert info["weight_rel_error"] ** 2 <= 0.4 + 1e-9
    expected = model.module(x)
    save(model, tmp_path / "lr.dsq")
    loaded = load(tmp_path / "lr.dsq", model="py:deepsqueeze.testing.models:TinyMLP")
    for name in summary:
        assert isinstance(loaded.module.get_submodule(name), LowRankLinear)
    assert torch.equal(loaded.module(x), expected)


def test_layers_that_would_not_save_parameters_stay_dense():
    model = tiny_model_handle()
    # fc3 is 16 -> 4: any rank r costs r * 20 >= 64 = dense from r = 4 on; rank 4 is full rank.
    summary = decompose_(model, LowRankConfig(rule="fixed", rank=4))
    assert "fc3" not in summary and isinstance(model.module.fc3, nn.Linear)
    assert isinstance(model.module.fc1, LowRankLinear) and model.module.fc1.rank == 4


@pytest.mark.parametrize("metric", ["params", "macs"])
def test_budget_is_respected_and_spent(metric):
    model = _conv_model()
    example = torch.randn(4, 3, 8, 8)
    pixels = {"0": 64, "2": 16}  # output pixels of the two convs at 8x8 input (the second has stride 2)
    dense = {n: m.weight.numel() * (pixels[n] if metric == "macs" else 1) for n, m in model.module.named_modules()
             if isinstance(m, nn.Conv2d)}
    cfg = LowRankConfig(rule="budget", budget=0.5, budget_metric=metric, linear=False, conv="tucker2")
    summary = decompose_(model, cfg, example_inputs=example)
    assert summary
    key = "params_after" if metric == "params" else "macs_after"
    after = sum(summary[n][key] if n in summary else dense[n] for n in dense)
    assert after <= 0.5 * sum(dense.values())
    assert after >= 0.4 * sum(dense.values())  # the greedy allocation spends most of the budget


def test_sensitivity_allocation_and_cp_round_trip(tmp_path):
    model = _conv_model()
    x = torch.randn(3, 3, 8, 8)
    decompose_(model, LowRankConfig(rule="budget", budget=0.6, allocation="sensitivity", conv="cp", linear=False),
               example_inputs=x)
    assert any(isinstance(m, CPConv2d) for m in model.module.modules())
    expected = model.module(x)
    save(model, tmp_path / "cp.dsq")
    loaded = load(tmp_path / "cp.dsq", model=CONVNET)
    assert torch.equal(loaded.module(x), expected)


def test_tucker_round_trip_and_stage_report(tmp_path):
    model = _conv_model()
    data = tiny_classification_data()
    data = type(data)("img", torch.randn(32, 3, 8, 8), data.train_y[:32], torch.randn(8, 3, 8, 8), data.test_y[:8], 4)
    ctx = StageContext(model, data=data, reference=copy.deepcopy(model), progress=False)
    lowrank_stage(model, LowRankConfig(rule="fixed", rank_ratio=0.5), ctx)
    assert isinstance(model.module[0], Tucker2Conv2d) and isinstance(model.module[2], Tucker2Conv2d)
    assert ctx.report[-1]["params_after"] < ctx.report[-1]["params_before"]
    x = torch.randn(2, 3, 8, 8)
    expected = model.module(x)
    save(model, tmp_path / "t.dsq")
    assert torch.equal(load(tmp_path / "t.dsq", model=CONVNET).module(x), expected)


def test_config_validation_and_recipe_round_trip():
    cfg = LowRankConfig(rule="budget", budget=0.25, budget_metric="macs", include=["fc*"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_to_dict(cfg)["type"] == "lowrank"
    with pytest.raises(RecipeError, match="rank or rank_ratio"):
        LowRankConfig(rule="fixed")
    with pytest.raises(RecipeError, match="budget"):
        LowRankConfig(rule="budget")
    with pytest.raises(RecipeError, match="MAC budget"):
        decompose_(tiny_model_handle(), LowRankConfig(rule="budget", budget=0.5, budget_metric="macs"))
