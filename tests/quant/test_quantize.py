"""quantize_ methods, the quantize stage, configs, and artifact round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deepsqueeze.artifact as artifact
from deepsqueeze.core.config import config_from_dict, config_to_dict
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.record import get_record
from deepsqueeze.errors import DataError, RecipeError
from deepsqueeze.primitives.quantize import sqnr_db
from deepsqueeze.quant import (
    Int8Conv2d,
    Int8DynamicConfig,
    Int8Linear,
    Int8StaticConfig,
    PackedIntLinear,
    QuantizeConfig,
    SmoothQuantConfig,
    WeightOnlyConfig,
    quantize_,
)
from deepsqueeze.quant.stage import quantize_stage
from deepsqueeze.testing.models import tiny_classification_data, tiny_model_handle
from deepsqueeze.testing.quant_models import tiny_bn_convnet_handle

CONFIGS = [
    Int8DynamicConfig(),
    Int8DynamicConfig(activations="per_tensor"),
    Int8StaticConfig(),
    Int8StaticConfig(observer="percentile", percentile=99.9),
    Int8StaticConfig(observer="mse"),
    SmoothQuantConfig(alpha=0.6),
    WeightOnlyConfig(bits=4, group_size=16),
    WeightOnlyConfig(bits=3, group_size=None, symmetric=True),
    QuantizeConfig(method="binary"),
    QuantizeConfig(method="ternary"),
]


def _batches(n: int = 4):
    data = tiny_classification_data()
    return [x for x, _ in data.batches("train", 64, limit=64 * n)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method.value}-{c.observer.value}-{c.bits}")
def test_quantize_then_artifact_round_trip(config, tmp_path):
    model = tiny_model_handle()
    x = torch.randn(32, 1, 4, 4)
    ref = model.module(x)
    quantize_(model.module, config, _batches())
    out = model.module(x)
    floor = {"binary": -5, "ternary": 0, "rtn": 12}.get(config.method.value, 25)
    assert sqnr_db(ref, out) > floor
    path = tmp_path / "m.dsq"
    size = artifact.save(model, path)
    loaded = artifact.load(path, model="py:deepsqueeze.testing.models:TinyMLP")
    assert torch.equal(loaded.module(x), out)
    assert path.stat().st_size == size
    artifact.save(model, tmp_path / "again.dsq")
    assert (tmp_path / "again.dsq").read_bytes() == path.read_bytes()


def test_static_cnn_folds_batchnorm_fuses_relu_and_round_trips(tmp_path):
    model = tiny_bn_convnet_handle()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(32, 1, 8, 8, generator=g) for _ in range(4)]
    x = torch.randn(16, 1, 8, 8, generator=g)
    ref = model.module(x)
    done = quantize_(model.module, Int8StaticConfig(), calib)
    assert done == ["0", "3", "8"]
    kinds = [type(m).__name__ for m in model.module]
    assert kinds[:6] == ["Int8Conv2d", "Identity", "Identity", "Int8Conv2d", "Identity", "Identity"]
    assert model.module[0].relu and model.module[0].bias is not None
    # conv -> conv and conv -> pool -> flatten -> Linear: the codes flow between the integer kernels
    assert model.module[0].quantized_output and model.module[3].quantized_output
    out = model.module(x)
    assert sqnr_db(ref, out) > 25
    artifact.save(model, tmp_path / "cnn.dsq")
    loaded = artifact.load(tmp_path / "cnn.dsq", model="py:deepsqueeze.testing.quant_models:TinyBNConvNet")
    assert isinstance(loaded.module[3], Int8Conv2d)
    assert torch.equal(loaded.module(x), out)


def test_artifact_stores_packed_integers(tmp_path):
    model = tiny_model_handle()
    fp32 = artifact.save(model, tmp_path / "fp32.dsq")
    quantize_(model.module, WeightOnlyConfig(bits=4, group_size=16))
    assert isinstance(model.module.fc1, PackedIntLinear)
    state = model.module.state_dict()
    assert state["fc1.codes"].dtype == torch.uint8 and state["fc1.codes"].shape == (32, 8)
    w4 = artifact.save(model, tmp_path / "w4.dsq")
    stored = sum(t.numel() * t.element_size() for t in state.values())
    assert stored < 4 * 1140 / 3  # 1140 fp32 parameters; 4-bit codes + group scales
    assert w4 < fp32  # (a tiny model's file is mostly manifest: MiniLM's ratio is measured by the benchmarks)


def test_include_exclude_and_embeddings():
    module = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    quantize_(module, Int8DynamicConfig(exclude=("2",), embeddings=False))
    assert [type(m).__name__ for m in module] == ["Embedding", "Int8Linear", "Linear"]
    quantize_(module, Int8DynamicConfig(include=("0",)))
    assert type(module[0]).__name__ == "Int8Embedding"


def test_calibrating_methods_need_data():
    with pytest.raises(DataError, match="calibrat"):
        quantize_(tiny_model_handle().module, Int8StaticConfig())


def test_stage_uses_context_data_and_reports():
    model = tiny_model_handle()
    ctx = StageContext(model=model, data=tiny_classification_data())
    quantize_stage(model, Int8StaticConfig(calibration_samples=128), ctx)
    assert isinstance(model.module.fc2, Int8Linear) and model.module.fc2.act == "static"
    assert ctx.report[-1]["layers"] == 3 and ctx.report[-1]["calibration_batches"] >= 1


@pytest.mark.parametrize("config", CONFIGS)
def test_config_round_trips_through_recipe_form(config):
    back = config_from_dict(config_to_dict(config))
    assert config_to_dict(back) == config_to_dict(config)


@pytest.mark.parametrize("bad", [
    {"type": "quantize", "method": "dynamic", "bits": 4},
    {"type": "quantize", "method": "rtn", "bits": 9},
    {"type": "quantize", "method": "dynamic", "group_size": 64},
    {"type": "quantize", "method": "median"},
    {"type": "quantize", "alpha": 2},
    {"type": "quantize", "observr": "mse"},
])
def test_bad_configs_raise_recipe_errors(bad):
    with pytest.raises(RecipeError):
        config_from_dict(bad)


def test_rtn_group_that_fits_no_divisor_falls_back_to_rows_with_its_reason():
    module = nn.Sequential(nn.Linear(11, 4), nn.Linear(4, 4))
    done = quantize_(module, WeightOnlyConfig(group_size=4))
    assert done == ["0", "1"] and module[0].group_size == 11 and module[1].group_size == 4
    entry = get_record(module).coverage[0]
    assert (entry.module, entry.action) == ("0", "compressed") and "fits no divisor of 11" in entry.reason


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_a_group_that_does_not_divide_takes_the_nearest_divisor_below_it(method):
    """SmolLM2's 576-wide rows with group 128: groups of 96, not one scale per 576 weights."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(576, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [torch.randn(16, 576)] if method != "rtn" else None
    quantize_(module, QuantizeConfig(method=method, bits=4, group_size=128, symmetric=False), batches)
    assert module[0].group_size == 96


@pytest.mark.parametrize("row,group,fit", [(576, 128, 96), (576, 64, 64), (1536, 128, 128), (11, 4, None),
                                           (100, 64, 50), (576, None, None), (96, 256, None)])
def test_fitting_group(row, group, fit):
    from deepsqueeze.primitives.quantize import fitting_group

    assert fitting_group(row, group) == fit


class _ResidualConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.head(torch.flatten(y + self.b(y), 1))


def test_static_keeps_float_outputs_where_a_float_op_consumes_them():
    """A conv feeding a residual addition (no quantized kernel) must hand over float, not codes."""
    module = _ResidualConvNet().eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)]
    x = torch.randn(8, 1, 8, 8, generator=g)
    ref = module(x)
    assert quantize_(module, Int8StaticConfig(), calib) == ["a", "b", "head"]
    assert not module.a.quantized_output and not module.b.quantized_output
    assert sqnr_db(ref, module(x)) > 25


def test_static_chains_codes_through_average_pooling():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10)).eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)]
    x = torch.randn(8, 1, 8, 8, generator=g)
    ref = module(x)
    quantize_(module, Int8StaticConfig(), calib)
    assert module[0].quantized_output and module[2].quantized_output and module[2].relu
    assert sqnr_db(ref, module(x)) > 25


@pytest.mark.parametrize("factory", ["TinyResNet", "DepthwiseSeparableCNN"])
def test_static_int8_folds_batchnorm_wherever_the_forward_applies_it(tmp_path, factory):
    """Issue 24 finding 10: a BatchNorm inside a residual block stayed float (stored fp32, exported as
    BatchNormalization) because folding only looked at positions in a Sequential."""
    from deepsqueeze.core.model import Model, Task
    from deepsqueeze.testing import models

    torch.manual_seed(0)
    module = getattr(models, factory)().eval()
    g = torch.Generator().manual_seed(1)
    for m in module.modules():  # statistics a trained net would have
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.randn(16, 1, 8, 8, generator=g)
    ref = module(x)
    calib = [torch.randn(32, 1, 8, 8, generator=g) for _ in range(4)]
    quantize_(module, Int8StaticConfig(), calib)
    assert not [n for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sqnr_db(ref, module(x)) > 20
    handle = Model(module, {"kind": "py"}, Task.CLASSIFIER, f"py:deepsqueeze.testing.models:{factory}", 0)
    from deepsqueeze.core.model import py_base

    handle.base = py_base(getattr(models, factory)())
    artifact.save(handle, tmp_path / "m.dsq")
    loaded = artifact.load(tmp_path / "m.dsq", model=f"py:deepsqueeze.testing.models:{factory}")
    assert not [n for n, m in loaded.module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert torch.equal(loaded.module(x), module(x))
