"""llama.cpp's k-quant super-blocks (Q4_K, Q5_K, Q6_K): codes chosen on their grids by round-to-nearest and GPTQ
(``gguf_type``), carried into GGUF exactly, each tensor of the type llama-quantize gives it."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from deepsqueeze.errors import RecipeError
from deepsqueeze.export import export
from deepsqueeze.export import gguf as gguf_export
from deepsqueeze.primitives import quantize as Q
from deepsqueeze.primitives.kquant import K_GRIDS, KGrid, kquant_qparams, super_block_grid
from deepsqueeze.quant.config import QuantizeConfig
from deepsqueeze.quant.gguf_types import tensor_grids
from deepsqueeze.quant.gptq import affine_column_quantizer, gptq_quantize, kquant_column_quantizer
from deepsqueeze.recipes.run import run_stages
from deepsqueeze.recipes.schema import parse_recipe
from deepsqueeze.resolve import resolve_model
from deepsqueeze.runtime import PackedIntLinear
from deepsqueeze.runtime.gguf_forms import gguf_form
from deepsqueeze.testing.hf_models import make_hf_dir

gguf = pytest.importorskip("gguf")
from tests.export.test_gguf import _text, _types  # noqa: E402

SIZES = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2)


def _on_grid(w: torch.Tensor, grid: KGrid) -> PackedIntLinear:
    layer = PackedIntLinear(w.shape[1], w.shape[0], grid.bits, grid.group, False, float_zero=not grid.symmetric)
    scale, zero = kquant_qparams(w, grid)
    layer.set_codes(Q.quantize(w, Q.QParams(scale, zero, grid.bits, False, Q.PerGroup(grid.group))), scale, zero)
    return layer


@pytest.mark.parametrize("kind, bits", [("Q4_K", 2), ("Q4_K", 3), ("Q4_K", 4), ("Q5_K", 5), ("Q6_K", 6)])
def test_codes_on_a_k_grid_are_written_exactly_in_llama_cpps_layout(kind, bits):
    g = K_GRIDS[kind]
    w = torch.randn(6, 768, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[2] = 0.0  # a pruned row: its super-blocks have no range at all
    w[4, :256] = w[4, :256].abs()  # a super-block with no negative weight: its minimums are 0
    layer = _on_grid(w, KGrid(kind, bits, g.group, g.symmetric, g.levels))
    form = gguf_form(layer)
    assert form.type == kind and form.exact
    back = gguf.quants.dequantize(form.data, getattr(gguf.GGMLQuantizationType, kind)).reshape(6, 768)
    ref = layer.dequantized_rows()
    assert float((torch.from_numpy(np.asarray(back)) - ref).abs().max()) <= 1e-6 * float(ref.abs().max())


def test_scales_off_the_grid_fall_back_to_a_block_type():
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    layer = _on_grid(w, K_GRIDS["Q4_K"])
    layer.scale.mul_(1.0 + 1e-3 * torch.rand(layer.scale.shape, generator=torch.Generator().manual_seed(1)))
    assert super_block_grid(layer.scale, 8, 63) is None
    assert gguf_form(layer).type == "Q4_1"


def test_gptq_chooses_codes_on_the_grid_and_beats_rounding_on_its_objective():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 512, generator=gen) * 0.05
    x = torch.randn(2048, 64, generator=gen) @ torch.randn(64, 512, generator=gen)  # correlated inputs
    x += 0.1 * torch.randn(2048, 512, generator=gen)
    h = 2 * x.T @ x / x.shape[0]
    grid = K_GRIDS["Q4_K"]
    result = gptq_quantize(w, h, kquant_column_quantizer(grid), grid.group, act_order=True)
    assert super_block_grid(result.scale, 8, 63) is not None
    assert super_block_grid(result.zero_point * result.scale, 8, 63, tolerance=1e-5) is not None
    dequant = affine_column_quantizer(4, float_zero=True).dequantize
    rounded = _on_grid(w, grid).dequantized_rows()

    def output_error(q: torch.Tensor) -> float:
        return float(((w - q) @ x.T).norm())

    assert output_error(result.dequantize(dequant)) < 0.8 * output_error(rounded)


def _hf(tmp_path, name="m"):
    return resolve_model(f"hf:{make_hf_dir('llama', tmp_path / name, **SIZES)}", progress=False)


def test_each_tensor_gets_llama_quantizes_type(tmp_path):
    model = _hf(tmp_path)
    types = {n: (g.type if g else None) for n, g in tensor_grids(model.module, "q4_k_m").items()}
    more = {0, 3, 6, 7}  # use_more_bits(i, 8): i < 1, i >= 7, (i - 1) % 3 == 2
    for i in range(8):
        assert types[f"transformer.model.layers.{i}.self_attn.q_proj"] == "Q4_K"
        assert types[f"transformer.model.layers.{i}.self_attn.v_proj"] == ("Q6_K" if i in more else "Q4_K")
        # 384 inputs are not whole super-blocks: llama.cpp's fallbacks, Q6_K -> Q8_0 and Q4_K -> Q5_0
        assert types[f"transformer.model.layers.{i}.mlp.down_proj"] == ("Q8_0" if i in more else "Q5_0")
    assert types["transformer.lm_head"] == "Q6_K" and types["transformer.model.embed_tokens"] == "Q4_K"
    small = {n: g.type for n, g in tensor_grids(model.module, "q4_k_s").items() if g}
    assert [small[f"transformer.model.layers.{i}.self_attn.v_proj"] for i in range(8)] == ["Q5_K"] * 4 + ["Q4_K"] * 4


@pytest.mark.skipif(gguf_export.gguf_runtime() != "llama.cpp", reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("ftype", ["q4_k_m", "q4_k_s", "q5_k_m", "q6_k"])
def test_the_types_are_those_llama_quantize_writes(tmp_path, ftype):
    import llama_cpp

    export(_hf(tmp_path), "gguf", tmp_path / "f32.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(), str(tmp_path / "q.gguf").encode(),
                                          params) == 0
    ours = _hf(tmp_path, "ours")
    run_stages(ours, parse_recipe({"stages": [{"type": "quantize", "method": "rtn", "gguf_type": ftype}]}), None,
               progress=False)
    export(ours, "gguf", tmp_path / "ours.gguf")
    assert _types(tmp_path / "ours.gguf") == _types(tmp_path / "q.gguf")


@pytest.mark.parametrize("runtime", ["transformers", pytest.param("llama.cpp", marks=pytest.mark.skipif(
    gguf_export.gguf_runtime() != "llama.cpp", reason="llama-cpp-python is not installed"))])
def test_a_gptq_q4_k_m_model_runs_in_gguf_as_in_torch(tmp_path, monkeypatch, runtime):
    monkeypatch.setattr(gguf_export, "gguf_runtime", lambda: runtime)
    model = _hf(tmp_path)
    stage = {"type": "quantize", "method": "gptq", "gguf_type": "q4_k_m", "act_order": True, "calibration_samples": 8}
    run_stages(model, parse_recipe({"stages": [stage]}), _text(), progress=False)
    result = export(model, "gguf", tmp_path / "m.gguf")
    assert result.check["worst_cosine_distance"] <= gguf_export.TOLERANCE_GGUF
    assert all(layer["exact"] == "true" for layer in result.layers)
    counts = collections.Counter(_types(tmp_path / "m.gguf").values())
    assert counts == {"Q4_K": 45, "F32": 17, "Q6_K": 5, "Q8_0": 4, "Q5_0": 4}


@pytest.mark.parametrize("fields, needle", [
    ({"method": "rtn", "bits": 4}, "remove bits"),
    ({"method": "gptq", "group_size": 32, "symmetric": False}, "remove group_size, symmetric"),
    ({"method": "dynamic"}, "method rtn or gptq"),
    ({"method": "rtn", "gguf_type": "q3_k_xl"}, "gguf_type"),
])
def test_gguf_type_refuses_what_it_would_override(fields, needle):
    with pytest.raises(RecipeError, match=needle):
        QuantizeConfig(**{"gguf_type": "q4_k_m", **fields})
