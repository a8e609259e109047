"""The ``gptq`` method of the quantize stage: packed output, sequential calibration, artifact round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepsqueeze.artifact import load, save
from deepsqueeze.errors import DataError
from deepsqueeze.primitives import packing
from deepsqueeze.quant import PackedIntEmbedding, PackedIntLinear, WeightOnlyConfig, quantize_
from deepsqueeze.quant.gptq import gptq_model_
from deepsqueeze.testing.block_models import tiny_block_batches, tiny_block_handle


def _rel_error(module: nn.Module, reference: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        num = sum(float((module(b) - reference(b)).pow(2).sum()) for b in batches)
        den = sum(float(reference(b).pow(2).sum()) for b in batches)
    return num / den


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_artifact_round_trip_evaluates_identically(bits, tmp_path):
    model = tiny_block_handle()
    batches = tiny_block_batches()
    done = quantize_(model.module, WeightOnlyConfig(method="gptq", bits=bits, group_size=16), batches)
    linears = [n for n in done if n != "embed"]
    assert len(linears) == 11 and "embed" in done
    for name in linears:
        layer = model.module.get_submodule(name)
        assert isinstance(layer, PackedIntLinear) and layer.bits == bits and layer.group_size == 16
        assert layer.codes.dtype == torch.uint8 and layer.codes.shape[1] == packing.packed_length(layer.in_features, bits)
    assert isinstance(model.module.embed, PackedIntEmbedding)
    path = tmp_path / "m.dsq"
    written = save(model, path)
    loaded = load(path, model="py:deepsqueeze.testing.block_models:TinyBlockNet")
    probe = tiny_block_batches(2, seed=9)
    with torch.no_grad():
        for b in probe:
            assert torch.equal(loaded.module(b), model.module(b))
    assert save(model, tmp_path / "again.dsq") == written
    assert (tmp_path / "again.dsq").read_bytes() == path.read_bytes()  # deterministic bytes


def test_gptq_packs_its_own_codes():
    model = tiny_block_handle()
    results = gptq_model_(model.module, tiny_block_batches(), bits=3, group_size=8, act_order=True)
    for name, result in results.items():
        layer = model.module.get_submodule(name)
        assert torch.equal(layer.int_codes().to(torch.int32), result.codes)
        assert torch.equal(layer.scale, result.scale.float())


@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_model_error_below_rtn(sequential):
    """3-bit groups of 16: GPTQ's model-output error on held-out inputs is well below round-to-nearest's."""
    reference = tiny_block_handle().module
    batches, held_out = tiny_block_batches(8), tiny_block_batches(4, seed=5)
    gptq = tiny_block_handle().module
    gptq_model_(gptq, batches, bits=3, group_size=16, sequential=sequential)
    rtn = tiny_block_handle().module
    quantize_(rtn, WeightOnlyConfig(method="rtn", bits=3, group_size=16, embeddings=False))
    gptq_error, rtn_error = _rel_error(gptq, reference, held_out), _rel_error(rtn, reference, held_out)
    assert gptq_error < 0.7 * rtn_error


def test_gptq_needs_calibration_data():
    model = tiny_block_handle()
    with pytest.raises(DataError, match="calibrat"):
        quantize_(model.module, WeightOnlyConfig(method="gptq"), None)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_per_layer_bits_in_one_stage_round_trip(method, tmp_path):
    from deepsqueeze.errors import RecipeError

    model = tiny_block_handle()
    names = [n for n, m in model.module.named_modules() if isinstance(m, nn.Linear)]
    overrides = {names[0]: 8, names[1]: 2, "*": 3}  # the first matching pattern wins
    config = WeightOnlyConfig(method=method, bits=4, group_size=16, overrides=overrides)
    quantize_(model.module, config, tiny_block_batches())
    widths = {n: model.module.get_submodule(n).bits for n in names}
    assert widths[names[0]] == 8 and widths[names[1]] == 2 and set(widths[n] for n in names[2:]) == {3}
    assert model.module.embed.bits == 3
    path = tmp_path / "m.dsq"
    save(model, path)
    loaded = load(path, model="py:deepsqueeze.testing.block_models:TinyBlockNet")
    probe = tiny_block_batches(2, seed=9)
    with torch.no_grad():
        for b in probe:
            assert torch.equal(loaded.module(b), model.module(b))
    for bad, match in [({"method": "dynamic"}, "per-layer bits"), ({"method": "rtn", "bits": 4},
                                                                   "2..8")]:
        with pytest.raises(RecipeError, match=match):
            WeightOnlyConfig(**bad, overrides={"x": 8} if bad["method"] == "dynamic" else {"x": 1})
