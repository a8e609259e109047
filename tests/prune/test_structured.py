import copy

import pytest
import torch
from torch import nn

from deepsqueeze.artifact import load, save
from deepsqueeze.core.context import StageContext
from deepsqueeze.core.counting import count_params
from deepsqueeze.core.model import Model, Task, py_base
from deepsqueeze.errors import UnsupportedLayerError
from deepsqueeze.eval import accuracy
from deepsqueeze.prune import ChannelPlan, PruneChannelsConfig, analyze, prune_, prune_channels_
from deepsqueeze.testing.models import DepthwiseSeparableCNN, PlainMLP, TinyResNet

X = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize(("factory", "expected_params"), [
    # hand-counted at ratio 0.5 (16 -> 8 and 32 -> 16 channels, residual-coupled channels cut together)
    (TinyResNet, 72 + 16 + 2 * (576 + 16 + 576 + 16) + (1152 + 32 + 2304 + 32 + 128 + 32) + (2304 + 32) * 2 + 170),
    # stem 8, depthwise 8, pw1 16, depthwise 16, pw2 12 + side 4 concatenated, flattened 16 x 4 x 4 into fc
    (DepthwiseSeparableCNN, 72 + 16 + 72 + 16 + 128 + 32 + 144 + 32 + 192 + 24 + 68 + 2570),
    # 64 -> 24 -> 16 -> 10
    (PlainMLP, 64 * 24 + 24 + 24 * 16 + 16 + 16 * 10 + 10),
])
def test_unseen_architectures_shrink_to_exact_counts_and_match_masked_originals(factory, expected_params):
    torch.manual_seed(0)
    original = factory().eval()
    with torch.no_grad():
        _randomize_bn(original)
    pruned = copy.deepcopy(original)
    graph = analyze(original, X)
    result = prune_channels_(pruned, X, ChannelPlan(0.5))
    assert count_params(pruned) == result.params_after == expected_params
    assert pruned(X).shape == original(X).shape
    # Equivalence: zeroing the removed channels' input columns in every consumer of the original gives
    # exactly the pruned model's function (the removed channels influence nothing else).
    with torch.no_grad():
        for role in graph.layers.values():
            if not isinstance(role.module, nn.Linear | nn.Conv2d) or getattr(role.module, "groups", 1) > 1:
                continue
            offset = 0
            for seg in role.in_layout:
                if seg.group in result.kept:
                    removed = sorted(set(range(seg.channels)) - set(result.kept[seg.group]))
                    for c in removed:
                        start = offset + c * seg.repeat
                        role.module.weight[:, start:start + seg.repeat] = 0
                offset += seg.channels * seg.repeat
        torch.testing.assert_close(pruned(X), original(X), rtol=1e-4, atol=1e-5)


def test_residual_coupling_puts_skip_connected_convs_in_one_group():
    graph = analyze(TinyResNet().eval(), X)
    g = graph.group_of("layer1.0.conv2")
    assert g is graph.group_of("stem.0") is graph.group_of("layer1.1.conv2")
    assert graph.group_of("layer2.0.shortcut.0") is graph.group_of("layer2.0.conv2")
    assert graph.group_of("layer1.0.conv1") is not g
    assert not graph.group_of("fc").prunable  # the class logits stay


def test_concat_and_flatten_give_offsets_and_repeats():
    graph = analyze(DepthwiseSeparableCNN().eval(), X)
    fc = graph.layers["fc"].in_layout
    assert [(s.channels, s.repeat) for s in fc] == [(24, 16), (8, 16)]
    assert graph.layers["dw1.0"].out_group == graph.group_of("stem.0").id


class _Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        y = self.conv(x)
        y = y.transpose(1, 2)  # mixes channels with a spatial dim: not prunable
        return self.fc(y.reshape(y.shape[0], -1))


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3)
        self.b = nn.Conv2d(8, 8, 3, groups=2)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x))).mean((2, 3))


def test_unhandled_patterns_are_left_alone_or_named():
    model = _Unknown().eval()
    graph = analyze(model, X)
    assert not graph.group_of("conv").prunable
    assert "transpose" in " ".join(graph.group_of("conv").blocked)
    before = count_params(model)
    prune_channels_(model, X, ChannelPlan(0.5))
    assert count_params(model) == before  # nothing prunable, nothing cut
    with pytest.raises(UnsupportedLayerError, match="cannot prune the output channels of conv: .*transpose"):
        prune_channels_(model, X, ChannelPlan(0.5, include=["conv"]))
    grouped = _Grouped().eval()
    with pytest.raises(UnsupportedLayerError, match="grouped convolution"):
        prune_channels_(grouped, X, ChannelPlan(0.5, include=["a"]))
    prune_channels_(grouped, X, ChannelPlan(0.5))
    assert grouped.a.out_channels == 8 and grouped.b.out_channels == 8  # blocked by the grouped conv


def test_untraceable_model_is_an_unsupported_layer_error():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x.flatten(1))
            return -self.fc(x.flatten(1))

    with pytest.raises(UnsupportedLayerError, match="cannot be traced"):
        prune_channels_(DataDependent(), X, ChannelPlan(0.5))


def test_overrides_exclude_and_round_to():
    model = PlainMLP().eval()
    prune_channels_(model, X, ChannelPlan(0.5, overrides={"body.1": 0.25}, exclude=["body.3"], round_to=8))
    assert model.body[1].out_features == 40  # 48 * 0.75 = 36, rounded up to 40
    assert model.body[3].out_features == 32 and model.body[3].in_features == 40


def test_bn_scale_keeps_the_channels_with_the_largest_gamma():
    model = TinyResNet().eval()
    with torch.no_grad():
        for bn in (model.layer1[0].bn1,):
            bn.weight.copy_(torch.arange(16, dtype=torch.float32))
    result = prune_channels_(model, X, ChannelPlan(0.5, include=["layer1.0.conv1"]), criterion="bn_scale")
    assert list(result.kept.values()) == [list(range(8, 16))]
    # neurons without a BatchNorm fall back to L2 magnitude
    a, b = PlainMLP().eval(), None
    b = copy.deepcopy(a)
    kept_bn = prune_channels_(a, X, ChannelPlan(0.5), criterion="bn_scale").kept
    assert kept_bn == prune_channels_(b, X, ChannelPlan(0.5), criterion="l2").kept


def test_stage_round_trips_through_the_artifact(tmp_path, digits):
    torch.manual_seed(0)
    module = TinyResNet()
    model = Model(module, py_base(module), Task.CLASSIFIER,
                  "py:deepsqueeze.testing.models:TinyResNet", count_params(module), (1, 8, 8), 10)
    ctx = StageContext(model, data=digits, progress=False)
    prune_(model, PruneChannelsConfig(ratio=0.5, epochs=1, lr=3e-3, schedule="iterative", rounds=2,
                                      criterion="taylor", taylor_batches=2, limit=256), ctx)
    report = ctx.report[-1]
    assert report["params_after"] == count_params(model.module) < report["params_before"] / 2
    reported = accuracy(model.module, digits)
    save(model, tmp_path / "s.dsq")
    loaded = load(tmp_path / "s.dsq", model="py:deepsqueeze.testing.models:TinyResNet")
    assert count_params(loaded.module) == count_params(model.module)
    assert loaded.module.layer2[1].conv1.out_channels == model.module.layer2[1].conv1.out_channels < 32
    for (k, a), (k2, b) in zip(model.module.state_dict().items(), loaded.module.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert accuracy(loaded.module, digits) == reported


def test_compress_with_the_shipped_recipe_loads_as_the_smaller_model(tmp_path, digits):
    from pathlib import Path

    from deepsqueeze.recipes import compress, load_recipe
    from deepsqueeze.recipes.schema import Recipe

    shipped = load_recipe(Path(__file__).parents[2] / "recipes" / "prune-structured.yaml")
    stage = shipped.stages[0].model_copy(update={"limit": 256})
    recipe = Recipe(stages=(stage,))
    result = compress("zoo:lenet5@digits", recipe, tmp_path / "v.dsq", "digits", progress=False,
                      max_drop=100)  # the recipe as written (a quarter of an epoch: over the default budget)
    loaded = load(tmp_path / "v.dsq")
    assert loaded.module[0].out_channels == 10 and loaded.module[2].out_channels == 25
    assert loaded.module[5].out_features == 250 and loaded.module[7].in_features == 250
    assert accuracy(loaded.module, digits) == result.metrics["accuracy"]
