"""AWQ (issue 11, item 6): a weight-only quantize method beside RTN and GPTQ, producing the same packed codes."""

from __future__ import annotations

import copy

import pytest
import torch

from deepsqueeze.core import config_from_dict, config_to_dict
from deepsqueeze.errors import DataError
from deepsqueeze.quant import AWQConfig, PackedIntLinear, QuantizeConfig, WeightOnlyConfig, quantize_
from deepsqueeze.quant.awq import awq_scale_, find_scale_groups, search_scale
from deepsqueeze.testing.quant_models import OutlierMLPBlock, outlier_batches


def _error(module, reference, batches) -> float:
    with torch.no_grad():
        num = sum(float((module(b) - reference(b)).pow(2).sum()) for b in batches)
        den = sum(float(reference(b).pow(2).sum()) for b in batches)
    return num / den


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_lowers_output_error_against_rtn_with_outlier_channels(bits):
    reference = OutlierMLPBlock().eval()
    calib, held_out = outlier_batches(8, seed=0), outlier_batches(4, seed=1)
    rtn, awq = copy.deepcopy(reference), copy.deepcopy(reference)
    quantize_(rtn, WeightOnlyConfig(bits=bits, group_size=32))
    done = quantize_(awq, AWQConfig(bits=bits, group_size=32), calib)
    assert sorted(done) == ["mlp.c_fc", "mlp.c_proj"]
    assert all(type(awq.get_submodule(n)) is type(rtn.get_submodule(n)) for n in done)  # same representation
    assert isinstance(awq.mlp.c_fc, PackedIntLinear) and awq.mlp.c_fc.bits == bits
    e_rtn, e_awq = _error(rtn, reference, held_out), _error(awq, reference, held_out)
    assert e_awq < 0.7 * e_rtn, (e_awq, e_rtn)


def test_scales_alone_leave_the_float_function_unchanged():
    reference = OutlierMLPBlock().eval()
    scaled = copy.deepcopy(reference)
    batches = outlier_batches(4)
    alphas, _ = awq_scale_(scaled, batches, ["mlp.c_fc", "mlp.c_proj"], bits=3, group_size=32, clip=False)
    assert list(alphas) == ["ln_2"] and alphas["ln_2"] > 0  # outliers: a nonzero alpha wins
    assert not torch.allclose(scaled.ln_2.weight, reference.ln_2.weight)
    with torch.no_grad():
        torch.testing.assert_close(scaled(batches[0]), reference(batches[0]), rtol=1e-5, atol=1e-5)


def test_alpha_zero_is_rtn_so_the_search_never_loses_on_its_sample():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 32, generator=g), torch.randn(16, 32, generator=g)
    s, alpha = search_scale(x, x.abs().mean(0), [w], 3, 16, False, grid=10)
    from deepsqueeze.quant.awq import _fake_quant

    def err(scale: torch.Tensor) -> float:
        return float((x @ (_fake_quant(w * scale, 3, 16, False) / scale).t() - x @ w.t()).pow(2).sum())

    assert err(s) <= err(torch.ones(32)) + 1e-6
    assert 0.0 <= alpha < 1.0


def test_groups_follow_structure_and_skip_gqa_value_output_pairs(tmp_path):
    pytest.importorskip("transformers")
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.testing.hf_models import make_hf_dir

    llama = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'l')}", progress=False).module
    targets = {n for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear)}
    groups = {g.producer.split("layers.0.")[-1]: g.consumers for g in find_scale_groups(llama, targets)
              if ".layers.0." in g.producer}
    assert set(groups) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}  # no v_proj: GQA


def test_awq_on_a_causal_lm_packs_every_linear_and_stays_close(tmp_path):
    pytest.importorskip("transformers")
    from deepsqueeze.core.calibrate import calibration_batches
    from deepsqueeze.data.datasets import TextData
    from deepsqueeze.resolve import resolve_model
    from deepsqueeze.testing.hf_models import make_hf_dir

    model = resolve_model(f"hf:{make_hf_dir('llama', tmp_path / 'l')}", progress=False)
    reference = copy.deepcopy(model.module)
    data = TextData("t", [f"calibration sentence number {i} with some words" for i in range(16)])
    batches = calibration_batches(model, data, samples=16, batch_size=8)
    done = quantize_(model.module, AWQConfig(bits=4, group_size=32, embeddings=False), batches)
    linears = [n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(done) == sorted(linears)
    inputs = model.module.tokenize(["a held-out sentence"])
    with torch.no_grad():
        out, ref = model.module(**inputs), reference(**inputs)
    assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 0.05


def test_awq_needs_calibration_and_round_trips_as_a_recipe_stage():
    with pytest.raises(DataError, match="awq calibrates"):
        quantize_(OutlierMLPBlock(), AWQConfig())
    config = AWQConfig(bits=3, group_size=64, awq_grid=10)
    again = config_from_dict(config_to_dict(config))
    assert config_to_dict(again) == config_to_dict(config) and again.method.value == "awq" and again.awq_grid == 10
    with pytest.raises(ValueError):
        QuantizeConfig(method="awq", bits=16)
