import torch
from torch import nn

from deepsqueeze.core import count_nonzero_params, count_params, iter_modules, set_submodule


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))


def test_iter_modules_filters_by_type_pattern_and_predicate():
    model = _mlp()
    names = [n for n, _ in iter_modules(model, types=nn.Linear)]
    assert names == ["0", "2.0", "2.1"]
    assert [n for n, _ in iter_modules(model, types=nn.Linear, include=["2.*"])] == ["2.0", "2.1"]
    assert [n for n, _ in iter_modules(model, types=nn.Linear, exclude=["2.1"])] == ["0", "2.0"]
    assert [n for n, _ in iter_modules(model, filter_fn=lambda n, m: isinstance(m, nn.ReLU))] == ["1"]


def test_set_submodule_replaces_nested_modules():
    model = _mlp()
    set_submodule(model, "2.1", nn.Identity())
    assert isinstance(model[2][1], nn.Identity)


def test_counts_see_zeros_and_custom_representations():
    model = _mlp()
    assert count_params(model) == 4 * 8 + 8 + 8 * 8 + 8 + 8 * 2 + 2
    with torch.no_grad():
        model[0].weight.zero_()
    assert count_nonzero_params(model) == count_params(model) - 32

    class Packed(nn.Module):
        def deepsqueeze_param_count(self) -> int:
            return 100

        def deepsqueeze_nonzero_count(self) -> int:
            return 40

    model[2][0] = Packed()
    assert count_params(model) == 4 * 8 + 8 + 100 + 8 * 2 + 2
