import pytest
import torch
from torch import nn

from deepsqueeze.core.config import config_from_dict, config_to_dict, registered_stages
from deepsqueeze.core.context import StageContext
from deepsqueeze.errors import DataError, RecipeError
from deepsqueeze.prune import (
    MaskSet,
    PruneConfig,
    enforce_masks,
    layer_sparsities,
    masks_from_zeros,
    prune_,
    schedules,
)
from deepsqueeze.prune.importance import taylor
from deepsqueeze.testing.models import TinyMLP, tiny_classification_data, tiny_model_handle


def test_every_prune_config_round_trips():
    for cls in registered_stages().values():
        if cls.__module__.startswith("deepsqueeze.prune"):
            cfg = cls()
            assert config_from_dict(config_to_dict(cfg)) == cfg


def test_config_validation_messages():
    with pytest.raises(RecipeError, match="epochs > 0"):
        PruneConfig(schedule="agp")
    with pytest.raises(RecipeError, match="sparsity"):
        PruneConfig(sparsity=1.5)
    with pytest.raises(RecipeError, match="did you mean 'sparsity'"):
        config_from_dict({"type": "prune", "sparsty": 0.5})


def test_layerwise_one_shot_hits_each_layer_exactly():
    torch.manual_seed(0)
    model = TinyMLP()
    prune_(model, PruneConfig(sparsity=0.75))
    for name, s in layer_sparsities(model).items():
        assert s == pytest.approx(0.75, abs=1e-9), name


def test_global_scope_and_overrides():
    torch.manual_seed(0)
    model = TinyMLP()
    with torch.no_grad():
        model.fc2.weight.add_(model.fc2.weight.sign())  # |w| >= 1: the global ranking must keep fc2
    prune_(model, PruneConfig(sparsity=0.5, scope="global", overrides={"fc3": 0.25}))
    s = layer_sparsities(model)
    assert s["fc3.weight"] == pytest.approx(0.25)
    # fc2 outranks every fc1 weight, but fc1 keeps its 1% floor (6 of 512) instead of being cut out
    assert int((model.fc1.weight != 0).sum()) == 6 and s["fc2.weight"] == pytest.approx(6 / 512)
    pooled = model.fc1.weight.numel() + model.fc2.weight.numel()
    zeros = int((model.fc1.weight == 0).sum() + (model.fc2.weight == 0).sum())
    assert zeros == round(0.5 * pooled)


def test_threshold_and_nm():
    model = TinyMLP()
    prune_(model, PruneConfig(threshold=0.05, storage="dense"))
    for p in (model.fc1.weight, model.fc2.weight):
        nz = p[p != 0]
        assert nz.abs().min() >= 0.05
    model = TinyMLP()
    prune_(model, PruneConfig(pattern="2:4"))
    blocks = (model.fc1.weight != 0).reshape(-1, 4).sum(1)
    assert torch.equal(blocks, torch.full_like(blocks, 2))


def test_nm_rejects_layers_that_do_not_divide():
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(RecipeError, match="multiple of 4"):
        prune_(model, PruneConfig(pattern="2:4"))


def test_finetuning_without_data_is_a_clear_error():
    with pytest.raises(DataError, match="needs training data"):
        prune_(TinyMLP(), PruneConfig(sparsity=0.5, epochs=1))


@pytest.mark.parametrize("schedule", ["one_shot", "iterative", "agp", "lottery"])
def test_schedules_keep_pruned_weights_at_zero_during_finetuning(schedule):
    model, data = tiny_model_handle(), tiny_classification_data()
    ctx = StageContext(model, data=data, progress=False)
    prune_(model, PruneConfig(sparsity=0.8, schedule=schedule, epochs=2, lr=1e-2, rounds=2), ctx)
    report = ctx.report[-1]
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-3)
    masks = masks_from_zeros(model.module)
    assert masks.overall_sparsity() == pytest.approx(0.8, abs=1e-3)
    expected_events = {"one_shot": 1, "iterative": 2, "lottery": 2}.get(schedule)
    if expected_events:
        assert report["prune_events"] == expected_events
    else:
        assert report["prune_events"] > 5


def test_agp_is_cubic_and_monotone():
    s = schedules.agp(0.9, start=0.0, end=0.5)
    values = [s(t, 100) for t in range(100)]
    assert values[0] == 0.0 and values[50] == pytest.approx(0.9) and values[99] == pytest.approx(0.9)
    assert values[25] == pytest.approx(0.9 * (1 - 0.5**3))
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    it = schedules.iterative(0.875, 3)
    assert [round(it(r, 3), 4) for r in range(3)] == [0.5, 0.75, 0.875]


def test_enforce_masks_hook_rezeroes():
    model = TinyMLP()
    mask = torch.rand(model.fc1.weight.shape) > 0.5
    hook = enforce_masks(model, {"fc1.weight": mask})
    hook(0, 1)
    assert torch.all(model.fc1.weight[~mask] == 0)
    assert isinstance(MaskSet(model, {}), MaskSet)


def test_taylor_needs_gradients():
    with pytest.raises(RecipeError, match="gradients"):
        taylor(torch.ones(2), None)


def test_taylor_and_random_criteria_run_on_data():
    for criterion in ("taylor", "random", "l2"):
        model, data = tiny_model_handle(), tiny_classification_data()
        ctx = StageContext(model, data=data, progress=False)
        prune_(model, PruneConfig(sparsity=0.5, criterion=criterion), ctx)
        assert ctx.report[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
