import json
import sys

import pytest
import torch

from deepsqueeze.cli.app import main
from deepsqueeze.errors import RecipeError
from deepsqueeze.eval import accuracy
from deepsqueeze.prune.sensitivity import allocate_sparsity, sensitivity_scan
from deepsqueeze.testing.models import TinyMLP, tiny_classification_data


def test_allocation_prunes_the_robust_layer_more():
    curves = {
        "big": [(0.0, 0.9), (0.5, 0.9), (0.9, 0.89), (0.95, 0.80)],
        "small": [(0.0, 0.9), (0.5, 0.85), (0.9, 0.5), (0.95, 0.2)],
    }
    sizes = {"big": 900, "small": 100}
    plan = allocate_sparsity(curves, sizes, 0.8)
    assert plan["big"] > plan["small"]
    overall = (plan["big"] * 900 + plan["small"] * 100) / 1000
    assert overall == pytest.approx(0.8, abs=1e-3)
    # unreachable target: the highest scanned sparsities come back
    assert allocate_sparsity(curves, sizes, 0.99) == {"big": 0.95, "small": 0.95}
    with pytest.raises(RecipeError, match="target"):
        allocate_sparsity(curves, sizes, 1.5)


def test_scan_restores_every_layer_and_degrades_monotonically_at_the_extremes():
    torch.manual_seed(0)
    model, data = TinyMLP(), tiny_classification_data()
    from deepsqueeze.train.loop import train_classifier

    train_classifier(model, data, epochs=3, lr=1e-2, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curves = sensitivity_scan(model, lambda m: accuracy(m, data), [0.5, 0.99])
    assert set(curves) == {"fc1", "fc2", "fc3"}
    for curve in curves.values():
        assert [s for s, _ in curve] == [0.0, 0.5, 0.99]
        assert curve[0][1] == accuracy(model, data)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert curves["fc3"][2][1] < curves["fc3"][0][1]  # 99% of the classifier gone hurts
    with pytest.raises(RecipeError, match=r"\(0, 1\)"):
        sensitivity_scan(model, lambda m: 0.0, [1.0])


def test_cli_json_and_table(capsys):
    def run(*argv):
        with pytest.raises(SystemExit) as info:
            main(list(argv))
            sys.exit(0)
        out, err = capsys.readouterr()
        return info.value.code or 0, out, err

    code, out, err = run("sensitivity", "zoo:lenet300@digits", "--data", "digits", "--sparsities", "0.5,0.9",
                         "--target", "0.8", "--limit", "200", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["curves"]) == {"1", "3", "5"}
    assert [p["sparsity"] for p in result["curves"]["1"]] == [0.0, 0.5, 0.9]
    assert result["reached"] == pytest.approx(0.8, abs=0.01)
    code, out, err = run("sensitivity", "zoo:lenet300@digits", "--data", "digits", "--sparsities", "0.5",
                         "--limit", "100")
    assert code == 0 and "accuracy" in out and "50%" in out and "│ 3 " in out
    code, out, err = run("sensitivity", "zoo:lenet300@digits", "--data", "digits", "--sparsities", "a,b")
    assert code == 2 and "--sparsities" in err and out == ""


def test_allocation_when_pruning_improves_the_metric():
    """A layer whose pruned points score above its unpruned one (noise on a small split) is allocated, not a crash."""
    curves = {"a": [(0.0, 0.90), (0.5, 0.91), (0.9, 0.80)], "b": [(0.0, 0.90), (0.5, 0.89), (0.9, 0.70)]}
    plan = allocate_sparsity(curves, {"a": 100, "b": 100}, 0.25)
    assert plan["a"] >= plan["b"] and 0.2 <= (plan["a"] + plan["b"]) / 2 <= 0.5
