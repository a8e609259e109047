"""Memory or speed (issue 28, item 3): every packed, ternary, sparse and factored layer races its kernels
against the dense float form of itself and runs the fastest; under ``memory`` (the default) no float copy
of a compressed weight is held after a forward, under ``speed`` a layer keeps its decoded weight where that
form won; ``evaluate`` says which kernel each layer ran."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepsqueeze.errors import ModelError
from deepsqueeze.runtime import kernels as K
from deepsqueeze.runtime.factored import CPConv2d, LowRankLinear, Tucker2Conv2d
from deepsqueeze.runtime.packed import PackedIntConv2d, PackedIntLinear
from deepsqueeze.runtime.sparse import SparseCSRLinear
from deepsqueeze.runtime.ternary import PackedTernaryConv2d


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSQUEEZE_CACHE", str(tmp_path))
    monkeypatch.delenv("DEEPSQUEEZE_PREFER", raising=False)
    monkeypatch.setattr(K, "_measured_sparse_kernel", {})
    yield
    K.set_prefer(None)


def _float_form_wins(monkeypatch) -> list[tuple[str, ...]]:
    """Make every race pick the dense float form (kept: ``float``, ``dense`` under speed; decoded per call:
    ``dequant``, ``dense`` under memory), as if it measured fastest; returns each race's candidates."""
    seen: list[tuple[str, ...]] = []

    def choose(key, fns, *args, **kwargs):
        seen.append(tuple(fns))
        for name in fns:
            fns[name]()  # every candidate runs (and builds what it needs) as in a real race
        return next(k for k in ("float", "dense", "dequant") if k in fns)

    monkeypatch.setattr(K, "choose", choose)
    return seen


def _layers():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=1)
    sparse = nn.Linear(96, 48)
    with torch.no_grad():
        sparse.weight.mul_(torch.rand_like(sparse.weight) > 0.9)
    ternary = PackedTernaryConv2d(8, 16, (3, 3), padding=(1, 1))
    ternary.set_levels(torch.randint(-1, 2, (16, 72)), torch.rand(16, 1) + 0.5, torch.rand(16, 1) + 0.5)
    return {
        "packed linear": (PackedIntLinear.from_float(nn.Linear(96, 48), 4, 32), torch.randn(40, 96)),
        "packed conv": (PackedIntConv2d.from_float(conv, 4), torch.randn(3, 8, 10, 10)),
        "ternary conv": (ternary, torch.randn(3, 8, 10, 10)),
        "sparse": (SparseCSRLinear.from_linear(sparse), torch.randn(40, 96)),
        "low-rank": (LowRankLinear.from_linear(nn.Linear(96, 48), 8), torch.randn(40, 96)),
        "tucker-2": (Tucker2Conv2d.from_conv(conv, (6, 4)), torch.randn(3, 8, 10, 10)),
        "cp": (CPConv2d.from_conv(conv, 5), torch.randn(3, 8, 10, 10)),
    }


def _held_float_weights(layer: nn.Module) -> int:
    """Float tensors the layer keeps beside its stored state that are as large as its dense weight."""
    stored = {id(t) for t in layer.state_dict(keep_vars=True).values()} | {id(p) for p in layer.parameters()}
    out_dim = next(getattr(layer, a) for a in ("out_features", "out_channels") if hasattr(layer, a))
    kept = [v[-1] if isinstance(v, tuple) else v for v in getattr(layer, "_cache", {}).values()]
    kept += [layer._dense] if getattr(layer, "_dense", None) is not None else []
    return sum(1 for t in kept if isinstance(t, torch.Tensor) and t.is_floating_point()
               and id(t) not in stored and t.shape[0] == out_dim)


@pytest.mark.parametrize("prefer", ["memory", "speed"])
@pytest.mark.parametrize("name", list(_layers()))
def test_the_dense_float_form_races_and_is_kept_only_where_speed_is_preferred(name, prefer, monkeypatch):
    K.set_prefer(prefer)
    races = _float_form_wins(monkeypatch)
    layer, x = _layers()[name]
    with torch.no_grad():
        reference = nn.functional.conv2d if x.dim() == 4 else nn.functional.linear
        expected = layer.factored_forward(x) if hasattr(layer, "factored_forward") else None
        y = layer(x)
        again = layer(x)  # the second call runs what the first chose (and kept)
    if expected is not None:
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    elif isinstance(layer, SparseCSRLinear):
        torch.testing.assert_close(y, reference(x, layer.dense_weight(), layer.bias), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, y)
    if name in ("packed conv", "ternary conv"):  # one kernel: the decode is once (speed) or per call (memory)
        assert races == [] and layer.kernel_choices() == {"all": "float" if prefer == "speed" else "dequant"}
    else:
        assert races and all({"float", "dense", "dequant"} & set(r) for r in races), races
        float_form = "dense" if name != "packed linear" else "float" if prefer == "speed" else "dequant"
        assert set(layer.kernel_choices().values()) == {float_form}
        assert any("float" in r for r in races) == (name == "packed linear" and prefer == "speed")
    held = _held_float_weights(layer)
    if prefer == "memory":
        assert held == 0, f"{name} holds a float copy under prefer memory"
    else:
        assert held == 1, f"{name} keeps no float weight under prefer speed"


def test_memory_is_the_default_and_the_environment_or_a_call_sets_it(monkeypatch):
    assert K.preferred() == "memory"
    monkeypatch.setenv("DEEPSQUEEZE_PREFER", "speed")
    assert K.preferred() == "speed"
    K.set_prefer("memory")
    assert K.preferred() == "memory"
    with pytest.raises(ModelError, match="memory"):
        K.set_prefer("fast")
    monkeypatch.setenv("DEEPSQUEEZE_PREFER", "fast")
    K.set_prefer(None)
    with pytest.raises(ModelError, match="DEEPSQUEEZE_PREFER"):
        K.preferred()


def test_a_kept_dense_weight_follows_its_factors_and_stages_run_the_factors(monkeypatch):
    K.set_prefer("speed")
    _float_form_wins(monkeypatch)
    layer = LowRankLinear.from_linear(nn.Linear(32, 24), 4)
    x = torch.randn(5, 32)
    with torch.no_grad():
        layer(x)
        layer.first.weight.mul_(2)  # an in-place update (an optimizer step) must not leave a stale copy
        torch.testing.assert_close(layer(x), layer.factored_forward(x))
        with K.reference_kernels():  # what recipes store runs the factors, the same bytes on every machine
            assert K.factored_kernel(layer, x) == "factors"
    layer.train()
    assert K.factored_kernel(layer, x) == "factors"  # gradients flow through the factors


def test_a_quantized_factor_has_no_dense_form(monkeypatch):
    _float_form_wins(monkeypatch)
    layer = LowRankLinear.from_linear(nn.Linear(64, 32), 8)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert layer(x).shape == (4, 32) and layer.kernel_choices() == {"few": "dense"}
        layer.second = PackedIntLinear.from_float(layer.second, 4, 8)  # a factor quantized after the race
        assert not layer.has_dense_form() and layer.kernel_choices() == {}
        torch.testing.assert_close(layer(x), layer.factored_forward(x))
    assert layer.kernel_choices() == {"few": "factors"}


def test_evaluate_names_each_layer_kernel(lenet300_digits, digits):
    import copy

    from deepsqueeze.eval import evaluate

    model = copy.deepcopy(lenet300_digits)
    linears = [name for name, m in model.module.named_modules() if isinstance(m, nn.Linear)]
    first, last = model.module.get_submodule(linears[0]), model.module.get_submodule(linears[-1])
    parent = model.module.get_submodule(linears[0].rpartition(".")[0]) if "." in linears[0] else model.module
    setattr(parent, linears[0].rpartition(".")[2], LowRankLinear.from_linear(first, 16))
    parent = model.module.get_submodule(linears[-1].rpartition(".")[0]) if "." in linears[-1] else model.module
    setattr(parent, linears[-1].rpartition(".")[2], PackedIntLinear.from_float(last, 4, 4))
    result = evaluate(model, digits, batch_size=8, repeat=2, min_seconds=0.0)
    assert result["prefer"] == "memory"
    assert set(result["kernels"]) == {"LowRankLinear", "PackedIntLinear"}, result["kernels"]
    assert all(n == 1 for counts in result["kernels"].values() for n in counts.values())
    assert any(k.startswith("few: ") for k in result["kernels"]["PackedIntLinear"])  # the batch of 8 timed


def test_an_unknown_preference_is_one_line(capsys):
    from deepsqueeze.testing.cli import run

    code, out, err = run(capsys, "evaluate", "zoo:lenet300", "--data", "digits", "--prefer", "fast")
    assert code == 2 and "Traceback" not in out + err
    assert len(err.splitlines()) == 1 and "'fast'" in err and "memory" in err
