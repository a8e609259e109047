"""Mixed precision: sensitivity is measured, budgets hold, the allocation is maximal, artifacts round-trip."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsqueeze.artifact import load, save
from deepsqueeze.errors import RecipeError
from deepsqueeze.quant import PackedIntEmbedding, PackedIntLinear, QuantizeConfig, quantize_
from deepsqueeze.quant.mixed import LayerCost, allocate_bits, layer_costs, layer_sensitivity, mixed_precision_
from deepsqueeze.testing.block_models import tiny_block_batches, tiny_block_handle


def _payload(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def test_sensitivity_falls_with_bits_and_restores_weights():
    model = tiny_block_handle().module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["embed", "blocks.0.query", "blocks.1.down", "head"]
    sens = layer_sensitivity(model, tiny_block_batches(2), names, (2, 4, 8), group_size=16)
    for name in names:
        assert sens[name][2] > sens[name][4] > sens[name][8] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_allocation_prefers_sensitive_layers():
    costs = [LayerCost("a", 100, {2: 25, 4: 50, 8: 100}), LayerCost("b", 100, {2: 25, 4: 50, 8: 100})]
    sens = {"a": {2: 10.0, 4: 1.0, 8: 0.01}, "b": {2: 0.1, 4: 0.01, 8: 0.001}}
    assert allocate_bits(costs, sens, budget_bytes=125) == {"a": 8, "b": 2}
    assert allocate_bits(costs, sens, avg_bits=3.0) == {"a": 4, "b": 2}
    with pytest.raises(RecipeError, match="raise it"):
        allocate_bits(costs, sens, budget_bytes=49)
    with pytest.raises(RecipeError, match="exactly one budget"):
        allocate_bits(costs, sens)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.lists(st.floats(0.0, 10.0), min_size=3, max_size=3)),
                min_size=1, max_size=5),
       st.floats(0.0, 1.0))
def test_allocation_respects_budget_and_is_maximal(layers, fraction):
    costs, sens = [], {}
    for i, (elements, errs) in enumerate(layers):
        errs = sorted(errs, reverse=True)
        costs.append(LayerCost(f"l{i}", elements, {b: elements * b for b in (2, 4, 8)}))
        sens[f"l{i}"] = dict(zip((2, 4, 8), errs, strict=True))
    lo, hi = sum(c.bytes_by_bits[2] for c in costs), sum(c.bytes_by_bits[8] for c in costs)
    budget = lo + fraction * (hi - lo)
    choice = allocate_bits(costs, sens, budget_bytes=budget)
    used = sum(c.bytes_by_bits[choice[c.name]] for c in costs)
    assert used <= budget
    for c in costs:  # maximal: no single upgrade still fits
        for b in (4, 8):
            if b > choice[c.name]:
                assert used - c.bytes_by_bits[choice[c.name]] + c.bytes_by_bits[b] > budget
    # never worse than the best uniform width that fits
    for b in (2, 4, 8):
        if sum(c.bytes_by_bits[b] for c in costs) <= budget:
            best_uniform = sum(sens[c.name][b] for c in costs)
            assert sum(sens[c.name][choice[c.name]] for c in costs) <= best_uniform + 1e-9


def test_greedy_matches_brute_force_on_small_problem():
    model = tiny_block_handle().module
    names = ["blocks.0.query", "blocks.0.up", "blocks.1.value", "head"]
    sens = layer_sensitivity(model, tiny_block_batches(2), names, (2, 4, 8), group_size=16)
    costs = layer_costs(model, names, (2, 4, 8), 16)
    budget = sum(c.bytes_by_bits[4] for c in costs)
    choice = allocate_bits(costs, sens, budget_bytes=budget)
    best = min(sum(sens[c.name][b] for c, b in zip(costs, combo, strict=True))
               for combo in itertools.product((2, 4, 8), repeat=len(costs))
               if sum(c.bytes_by_bits[b] for c, b in zip(costs, combo, strict=True)) <= budget)
    assert sum(sens[c.name][choice[c.name]] for c in costs) <= 1.5 * best


def test_max_bytes_bounds_the_payload():
    model = tiny_block_handle().module
    fp32 = _payload(model)
    budget = fp32 // 5
    choice = mixed_precision_(model, tiny_block_batches(4), max_bytes=budget, group_size=16)
    assert _payload(model) <= budget
    assert set(choice.values()) - {2, 3, 4, 8} == set() and len(set(choice.values())) > 1
    assert isinstance(model.embed, PackedIntEmbedding) and isinstance(model.head, PackedIntLinear)
    for name, bits in choice.items():
        assert model.get_submodule(name).bits == bits


def test_mixed_stage_method_round_trips(tmp_path):
    model = tiny_block_handle()
    config = QuantizeConfig(method="mixed", bits=8, group_size=16, avg_bits=3.5)
    done = quantize_(model.module, config, tiny_block_batches(4))
    widths = {name: model.module.get_submodule(name).bits for name in done}
    elements = {name: model.module.get_submodule(name).deepsqueeze_param_count() for name in done}
    weights = {name: model.module.get_submodule(name)._rows * model.module.get_submodule(name)._cols for name in done}
    assert sum(widths[n] * weights[n] for n in done) <= 3.5 * sum(weights.values())
    assert all(elements[n] >= weights[n] for n in done)
    save(model, tmp_path / "m.dsq")
    loaded = load(tmp_path / "m.dsq", model="py:deepsqueeze.testing.block_models:TinyBlockNet")
    with torch.no_grad():
        for b in tiny_block_batches(2, seed=3):
            assert torch.equal(loaded.module(b), model.module(b))
    with pytest.raises(RecipeError, match="budget"):
        quantize_(tiny_block_handle().module, QuantizeConfig(method="mixed", bits=8), tiny_block_batches(1))
